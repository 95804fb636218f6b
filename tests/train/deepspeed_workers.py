"""The checks run inside each rank of test_deepspeed's 2-rank gloo job: the DeepSpeed engine against the torch
engine on the same seed, layout and data (see tests/parallel/spawn_harness for how checks are recorded)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from ep_helpers import GlobalBatchSource, copy_checkpoint, shard_of, tiny_run  # noqa: E402

from sae_dist.parallel.expert_parallel import ExpertParallelContext  # noqa: E402
from sae_dist.parallel.mesh import build_mesh  # noqa: E402
from sae_dist.run_dir import checkpoint_name, latest_checkpoint  # noqa: E402
from sae_dist.train import checkpoint as ckpt  # noqa: E402
from sae_dist.train.deepspeed_engine import DeepSpeedEngine  # noqa: E402
from sae_dist.train.deepspeed_zero import project_partition_  # noqa: E402
from sae_dist.train.init import init_biases_from_batch  # noqa: E402
from sae_dist.train.multi import prepare_sweep, train_sweep  # noqa: E402
from sae_dist.train.optim import normalize_rows_, project_rows_  # noqa: E402
from sae_dist.train.run import build_trainer  # noqa: E402
from sae_dist.train.trainer import Trainer  # noqa: E402
from sae_dist.validation import sweep_members  # noqa: E402

EXACT = dict(rtol=0, atol=0)
MODEL = dict(rtol=1e-5, atol=1e-6)
"""One step: DeepSpeed divides gradient buckets by W before summing them, the torch engine after, and the global
norm sums partitions instead of tensors; only the rounding of those sums may differ (measured on W = 2, where the
division is exact: bit for bit for the Switch SAE, up to 5e-10 on TopK gradients)."""
TRAINING = dict(rtol=1e-5, atol=1e-6)
"""Six float32 Adam steps carrying those differences (measured: bit for bit for the Switch SAE, 3e-8 for ReLU)."""
LAYOUTS = [(2, 1), (2, 2), (1, 1), (1, 2)]
"""(P, ZeRO stage) pairs on W = 2 ranks: experts sharded, or replicated on both ranks (P = 1)."""


def build(run, rank: int, world: int, engine: str) -> Trainer:
    """A trainer of `engine` through the run's hook, on the ("dp", "ep") mesh of `run.parallel.ep_size`."""
    run.trainer.engine = engine
    ctx = ExpertParallelContext(build_mesh("cpu", run.parallel.ep_size))
    return build_trainer(run, GlobalBatchSource(run, rank, world), ctx, torch.device("cpu"))


def check_one_step(folder: Path, rank: int, world: int, ep_size: int, stage: int, kind: str = "switch",
                   dtype: str = "float32") -> None:
    """Forward, loss, the global norm, every gradient after reduction and projection, and the weights after the
    clipped Adam step and renormalisation."""
    name = f"step_{kind}_P{ep_size}_z{stage}_{dtype}"
    runs = [tiny_run(folder / f"{name}_{engine}", ep_size=ep_size, kind=kind, zero_stage=stage, grad_clip=0.05,
                     dtype=dtype) for engine in ("torch", "deepspeed")]
    reference, trainer = build(runs[0], rank, world, "torch"), build(runs[1], rank, world, "deepspeed")
    assert isinstance(trainer.engine, DeepSpeedEngine)
    x_TD = reference.source.next_batch(reference.local_batch)
    results = []
    for t in (reference, trainer):
        init_biases_from_batch(t.model, t.ctx.gather_rows(x_TD))  # module weights only: DeepSpeed must pick it up
        for w_dec in t.model.decoder_weights():
            normalize_rows_(w_dec.detach())
        out, terms, loss = t.stepper.forward_loss(x_TD, None, t.model.loss_weights(0.0))
        t.engine.backward(loss)
        results.append((out, terms, loss, t.engine.reduce_gradients()))
    (ref_out, ref_terms, ref_loss, ref_norm), (out, terms, loss, norm) = results
    torch.testing.assert_close(out.x_hat_TD, ref_out.x_hat_TD, **EXACT)
    for term in ref_terms:
        torch.testing.assert_close(terms[term], ref_terms[term], **EXACT)
    torch.testing.assert_close(loss, ref_loss, **EXACT)
    assert ref_norm > 2 * runs[0].trainer.grad_clip, "the clip must be active for this check to mean anything"
    torch.testing.assert_close(norm, ref_norm, **MODEL)
    from deepspeed.utils import safe_get_full_grad

    ref_params = dict(reference.model.named_parameters())
    expected_grads = {pname: param.grad.clone() for pname, param in ref_params.items()}
    decoders = {id(w_dec) for w_dec in reference.model.decoder_weights()}
    for pname, param in ref_params.items():  # the torch engine projects inside its optimizer's step
        if id(param) in decoders:
            project_rows_(param.detach(), expected_grads[pname])
    for pname, param in trainer.model.named_parameters():
        torch.testing.assert_close(safe_get_full_grad(param), expected_grads[pname], **MODEL,
                                   msg=lambda m: f"{pname}: {m}")
    for w_dec in trainer.model.decoder_weights():  # projected: no row's gradient has a component along it
        full = safe_get_full_grad(w_dec)
        assert (full * w_dec).sum(-1).abs().max() < 1e-6 * full.abs().max()
    finite = torch.tensor(True)
    for t, t_norm in ((reference, ref_norm), (trainer, norm)):
        t.engine.update(t_norm, finite)
    for pname, param in trainer.model.named_parameters():
        torch.testing.assert_close(param, ref_params[pname], **MODEL, msg=lambda m: f"{pname}: {m}")


def check_projection_of_split_rows(rank: int, world: int) -> None:
    """A decoder gradient split between two ranks in the middle of a row (and held by one rank alone) is projected
    exactly as the whole gradient is by the torch backend's `project_rows_`."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    w_dec = torch.nn.Parameter(rows / rows.norm(dim=-1, keepdim=True))  # unit rows, as the step keeps them
    w_dec._dp_group = dist.group.WORLD
    full_grad = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    expected = torch.nn.Parameter(w_dec.detach().clone())
    expected.grad = full_grad.clone()
    project_rows_(expected.detach(), expected.grad)
    for split in (52, 105):  # mid-row (52 = 7 * 7 + 3); everything on rank 0
        bounds = [(0, split), (split, 105)][rank]
        part = full_grad.flatten()[bounds[0] : bounds[1]].clone()
        project_partition_(w_dec, (part, bounds[0]) if part.numel() else None)
        torch.testing.assert_close(part, expected.grad.flatten()[bounds[0] : bounds[1]], rtol=1e-12, atol=1e-15)


def final_state(run) -> dict[str, torch.Tensor]:
    """Every tensor of a run's last checkpoint (weights, Adam moments and steps, dead-latent counters)."""
    return ckpt.read_global_state(latest_checkpoint(run.trainer.out_dir))


def assert_states_match(state: dict, expected: dict, tol: dict) -> None:
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(state[key], tensor, **tol, msg=lambda m: f"{key}: {m}")


def check_training(folder: Path, rank: int, world: int, ep_size: int, stage: int, kind: str = "switch") -> None:
    """Six full steps (two checkpoints) of each engine: equal weights, Adam state and dead-latent counters."""
    name = f"train_{kind}_P{ep_size}_z{stage}"
    rows = []
    for engine in ("torch", "deepspeed"):
        run = tiny_run(folder / f"{name}_{engine}", ep_size=ep_size, kind=kind, zero_stage=stage)
        rows.append(build(run, rank, world, engine).train())
    assert rows[1]["step"] == rows[0]["step"] == 6
    for metric in ("loss", "mse", "grad_norm", "lr"):
        assert abs(rows[1][metric] - rows[0][metric]) <= 1e-5 * abs(rows[0][metric]) + 1e-7, metric
    saved = [ckpt.read_global_state(folder / f"{name}_{engine}" / "checkpoints" / checkpoint_name(6))
             for engine in ("torch", "deepspeed")]
    assert_states_match(saved[1], saved[0], TRAINING)


def resume(folder: Path, source_run: str, target: str, rank: int, world: int, engine: str, **layout) -> Trainer:
    """A trainer of `engine` resumed from the step-3 checkpoint of `source_run` (copied into its own folder)."""
    if rank == 0:
        copy_checkpoint(folder / source_run, 3, folder / target)
    dist.barrier()
    trainer = build(tiny_run(folder / target, resume=True, **layout), rank, world, engine)
    assert trainer.maybe_resume() and trainer.step == 3
    return trainer


def check_resume_exact(folder: Path, rank: int, world: int) -> None:
    """The DeepSpeed engine restores its own checkpoint exactly (weights, Adam moments and step in the
    partitions) and continues bit for bit like the unbroken run."""
    source = "train_switch_P2_z2_deepspeed"
    trainer = resume(folder, source, "resume_ds_from_ds", rank, world, "deepspeed", ep_size=2, zero_stage=2)
    saved = saved_state(folder, "resume_ds_from_ds", 3)
    adam_state = trainer.engine.optimizer_state().state
    params = dict(trainer.model.named_parameters())
    dispatcher = trainer.model.dispatcher
    for name, tensor in trainer.model.state_dict().items():
        torch.testing.assert_close(tensor, shard_of(name, saved[f"model.{name}"], dispatcher), **EXACT)
        for key, value in adam_state[params[name]].items():
            expected = saved[f"optim.{name}.{key}"]
            torch.testing.assert_close(value, shard_of(name, expected, dispatcher) if value.dim() else expected, **EXACT)
    trainer.train()
    assert_states_match(final_state(trainer.run), saved_state(folder, source, 6), EXACT)


def saved_state(folder: Path, run_name: str, step: int) -> dict[str, torch.Tensor]:
    return ckpt.read_global_state(folder / run_name / "checkpoints" / checkpoint_name(step))


def check_resume_across_engines(folder: Path, rank: int, world: int) -> None:
    """A torch-engine checkpoint continues on the DeepSpeed engine, and the reverse, like the unbroken run."""
    for source_engine, engine in (("torch", "deepspeed"), ("deepspeed", "torch")):
        source = f"train_switch_P2_z1_{source_engine}"
        trainer = resume(folder, source, f"resume_{engine}_from_{source_engine}", rank, world, engine, ep_size=2)
        trainer.train()
        assert_states_match(final_state(trainer.run), saved_state(folder, source, 6), TRAINING)


def check_sweep(folder: Path, rank: int, world: int) -> None:
    """A sweep (two SAEs of other k and M on one stream, P = 2, ZeRO 2: one DeepSpeed engine per member in each
    process) ends as the torch engine's sweep: every member's weights, Adam state and dead-latent counters."""
    for engine in ("torch", "deepspeed"):
        run = tiny_run(folder / f"sweep_{engine}", ep_size=2, zero_stage=2, engine=engine)
        run.sweep = [{"sae.k": 4}, {"sae.k": 8, "sae.num_latents": 64}]
        train_sweep(prepare_sweep(run, world), ExpertParallelContext(build_mesh("cpu", 2)), eval_batches=1)
    for member in sweep_members(run):
        saved = [ckpt.read_global_state(latest_checkpoint(folder / f"sweep_{engine}" / member.name))
                 for engine in ("torch", "deepspeed")]
        assert_states_match(saved[1], saved[0], TRAINING)


def two_ranks(rank: int, world: int, folder: Path, check) -> None:
    with check("projection_split_rows"):
        check_projection_of_split_rows(rank, world)
    for ep_size, stage in LAYOUTS:
        with check(f"step_P{ep_size}_z{stage}"):
            check_one_step(folder, rank, world, ep_size, stage)
    for ep_size, stage in LAYOUTS[:3]:
        with check(f"training_P{ep_size}_z{stage}"):
            check_training(folder, rank, world, ep_size, stage)
    with check("step_bfloat16"):
        check_one_step(folder, rank, world, 2, 2, dtype="bfloat16")
    for kind, stage in (("topk", 1), ("relu", 2)):
        with check(f"step_{kind}"):
            check_one_step(folder, rank, world, 1, stage, kind)
        with check(f"training_{kind}"):
            check_training(folder, rank, world, 1, stage, kind)
    with check("resume_exact"):
        check_resume_exact(folder, rank, world)
    with check("resume_across_engines"):
        check_resume_across_engines(folder, rank, world)
    with check("sweep"):
        check_sweep(folder, rank, world)
