"""Shared pieces of the expert-parallel tests: constructed routings, a layout-independent data source, configs."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import Tensor

from sae_dist.config import DataConfig, RunConfig, SAEConfig, TrainerConfig
from sae_dist.data.source import ActivationSource
from sae_dist.data.synthetic import SyntheticSource
from sae_dist.models import architecture, build_sae
from sae_dist.run_dir import LATEST_FILE, checkpoint_name
from sae_dist.validation import validate

D_MODEL = 12
ROUTED_EXPERTS = [0] * 9 + [1] * 6 + [3] * 17
"""Expert of each of 32 global tokens, in rank order: expert 2 gets none, and on 4 ranks rank 0 sends only to
expert 0 while ranks 2 and 3 send only to expert 3 (so most (rank, expert) pairs have no tokens)."""


def routed_batch(experts: list[int], d: int = D_MODEL, seed: int = 0) -> Tensor:
    """Float64 tokens that a `routed_model` sends to the listed experts."""
    g = torch.Generator().manual_seed(seed)
    x_TD = 0.3 * torch.randn(len(experts), d, generator=g, dtype=torch.float64)
    x_TD[torch.arange(len(experts)), torch.tensor(experts)] += 6.0
    return x_TD


def routed_model(cfg: SAEConfig, dispatcher=None, seed: int = 3, d: int = D_MODEL):
    """A float64 Switch SAE whose router sends a token with a large coordinate e to expert e (a transcoder's b_out
    and W_skip away from their initial values)."""
    sae = build_sae(cfg, d, seed, dispatcher).double()
    g = torch.Generator().manual_seed(1)
    n = cfg.num_experts
    with torch.no_grad():
        sae.input_bias.copy_(0.1 * torch.randn(d, generator=g))
        sae.router.weight.zero_()
        sae.router.weight[:, :n] += 4.0 * torch.eye(n)
        sae.router.weight.add_(0.01 * torch.randn(n, d, generator=g))
        if sae.transcoder:
            sae.b_out.copy_(0.1 * torch.randn(sae.d_out, generator=g))
        if sae.w_skip is not None:
            sae.w_skip.copy_(0.1 * torch.randn(sae.d_out, d, generator=g))
    return sae


def expert_slice(dispatcher) -> slice:
    return slice(dispatcher.first_local_expert, dispatcher.first_local_expert + dispatcher.num_local_experts)


def load_shard(ep_model, full_model) -> None:
    """Copy a single-device model's weights into an expert-parallel one (its local experts only)."""
    rows = expert_slice(ep_model.dispatcher)
    state = {k: v[rows] if k.startswith("experts.") else v for k, v in full_model.state_dict().items()}
    ep_model.load_state_dict(state)


def shard_of(name: str, full: Tensor, dispatcher) -> Tensor:
    """The part of a full (single-device) state-dict tensor that an expert-parallel rank holds."""
    return full[expert_slice(dispatcher)] if name.startswith("experts.") else full


def local_latents(full_L: Tensor, dispatcher, num_experts: int = 4) -> Tensor:
    """The entries of a flat per-latent vector [N * M_e] that belong to a rank's local experts."""
    return full_L.view(num_experts, -1)[expert_slice(dispatcher)].flatten()


def copy_checkpoint(source_run: Path, step: int, target: Path) -> Path:
    """A new run folder holding only checkpoint `step` of `source_run`, as its latest; returns the checkpoint."""
    name = checkpoint_name(step)
    (target / "checkpoints").mkdir(parents=True)
    shutil.copytree(source_run / "checkpoints" / name, target / "checkpoints" / name)
    (target / "checkpoints" / LATEST_FILE).write_text(name)
    return target / "checkpoints" / name


class GlobalBatchSource(ActivationSource):
    """Rank `rank`'s rows of one global synthetic stream: global batch i is the same on every layout, so runs on
    different numbers of ranks see the same data (and one process sees the concatenated batch)."""

    def __init__(self, run: RunConfig, rank: int = 0, world_size: int = 1):
        self.stream = SyntheticSource.from_config(run.data, run.trainer.seed, d_out=run.sae.d_out)
        self.d_model = self.stream.d_model
        self.rank, self.world_size = rank, world_size

    def next_batch(self, batch_size: int) -> Tensor:
        x_BD = self.stream.next_batch(batch_size * self.world_size)
        return x_BD[self.rank * batch_size : (self.rank + 1) * batch_size]

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


def tiny_run(out_dir, ep_size=None, capacity_factor=None, kind="switch", **trainer) -> RunConfig:
    """A Switch SAE (or a dense one, `kind`) small enough that 4 ranks on 2 cores train it in a fraction of a
    second per step. AuxK takes its defaults: on for TopK (1/32; latents die after 2 steps), off for Switch."""
    options = dict(batch_size=64, steps=6, log_every=1, checkpoint_every=3, out_dir=str(out_dir), progress=False,
                   tensorboard=False, lr=5e-3)
    options.update(trainer)
    run = RunConfig(
        sae=SAEConfig(kind=kind, num_latents=128, num_experts=4 if architecture(kind).routed else 1, k=4, dead_tokens=128,
                      lb_alpha=0.1, l1_coefficient=0.05),
        data=DataConfig(source="synthetic", d_model=32, synthetic_features=64, synthetic_active=4),
        trainer=TrainerConfig(**options),
    )
    run.parallel.ep_size, run.parallel.capacity_factor = ep_size, capacity_factor
    validate(run)
    return run
