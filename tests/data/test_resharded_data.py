"""A run saved by 2 gloo ranks and resumed in one process reads on without repeating a cache row: the resumed
trainer continues with exactly what `resume_state` makes of the rank files of both saved ranks (the
redistribution itself, e.g. 2 -> 3 -> 1 ranks, is tested in test_order.py and test_cache.py)."""

import json
from pathlib import Path

import torch

from sae_dist.config import DataConfig, RunConfig, SAEConfig, TrainerConfig
from sae_dist.data import CachedActivationSource, resume_state, write_cache
from sae_dist.data.source import ActivationSource
from sae_dist.parallel.expert_parallel import ExpertParallelContext
from sae_dist.parallel.mesh import build_mesh
from sae_dist.run_dir import checkpoint_name, rank_file
from sae_dist.train.trainer import Trainer
from sae_dist.validation import validate
from tests.parallel.spawn_harness import spawn_checks

D_MODEL, GLOBAL_BATCH, STEPS = 16, 48, 3


class IdRows(ActivationSource):
    """Row i: column 0 = i / 1000 (its id), the rest fixed noise."""

    d_model = D_MODEL

    def __init__(self) -> None:
        self.next_row = 0

    def next_batch(self, batch_size: int) -> torch.Tensor:
        rows = torch.randn(batch_size, D_MODEL, generator=torch.Generator().manual_seed(self.next_row))
        rows[:, 0] = torch.arange(self.next_row, self.next_row + batch_size) / 1000
        self.next_row += batch_size
        return rows

    def state_dict(self) -> dict:
        return {"next_row": self.next_row}

    def load_state_dict(self, state: dict) -> None:
        self.next_row = state["next_row"]


class Recording(ActivationSource):
    """Writes the row ids of every batch it serves to `log`."""

    def __init__(self, source: ActivationSource, log: Path) -> None:
        self.source, self.log, self.d_model = source, log, source.d_model

    def next_batch(self, batch_size: int) -> torch.Tensor:
        batch = self.source.next_batch(batch_size)
        with self.log.open("a") as f:
            f.write(json.dumps(ids(batch)) + "\n")
        return batch

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


def ids(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0] * 1000).round().long().tolist()


def run_config(folder: Path, steps: int) -> RunConfig:
    run = RunConfig(
        sae=SAEConfig(kind="switch", num_latents=64, num_experts=4, k=4, lb_alpha=0.1),
        data=DataConfig(source="cache", cache_dir=str(folder / "cache"), shuffle_buffer=64, cache_verify=False),
        trainer=TrainerConfig(batch_size=GLOBAL_BATCH, steps=steps, checkpoint_every=STEPS, log_every=1,
                              out_dir=str(folder / "run"), progress=False, tensorboard=False, resume=steps > STEPS),
    )
    run.parallel.ep_size = 1  # data-parallel replicas: 4 experts fit any world size
    validate(run)
    return run


def recorded_trainer(folder: Path, steps: int, rank: int, world: int, ctx=None) -> Trainer:
    run = run_config(folder, steps)
    source = CachedActivationSource(folder / "cache", 64, run.trainer.seed, rank, world, verify=False)
    return Trainer(run, Recording(source, folder / f"ids_w{world}_r{rank}.jsonl"), ctx)


def train_two_ranks(rank: int, world: int, folder: Path, check) -> None:
    trainer = recorded_trainer(folder, STEPS, rank, world, ExpertParallelContext(build_mesh("cpu", 1)))
    with check("trained"):
        trainer.train()


def test_resume_in_one_process_continues_exactly_the_two_rank_streams(tmp_path):
    write_cache(IdRows(), tmp_path / "cache", num_tokens=4000, shard_tokens=1000)
    spawn_checks(train_two_ranks, 2, tmp_path, "saved").require("trained")
    recorded_trainer(tmp_path, 2 * STEPS, 0, 1).train()
    read = lambda world, rank: [json.loads(line) for line in (tmp_path / f"ids_w{world}_r{rank}.jsonl").open()]
    before = [row for rank in range(2) for batch in read(2, rank) for row in batch]
    after = [row for batch in read(1, 0) for row in batch]
    assert len(before) == len(after) == STEPS * GLOBAL_BATCH
    assert len(set(before + after)) == len(before) + len(after)  # no row read twice
    checkpoint = tmp_path / "run" / "checkpoints" / checkpoint_name(STEPS)
    states = [torch.load(checkpoint / rank_file(rank), weights_only=False)["data"] for rank in range(2)]
    assert states[0] != states[1]
    expected = CachedActivationSource(tmp_path / "cache", 64, 0, 0, 1, verify=False)
    expected.load_state_dict(resume_state(states, 0, 1))
    assert read(1, 0) == [ids(expected.next_batch(GLOBAL_BATCH)) for _ in range(STEPS)]
