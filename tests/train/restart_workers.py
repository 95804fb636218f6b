"""The checks of the 2-rank gloo job in test_restarts.py (every rank runs every check; see spawn_harness)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from sae_dist.config import ConfigError, register_configs
from sae_dist.data.synthetic import SyntheticSource
from sae_dist.parallel.expert_parallel import ExpertParallelContext
from sae_dist.parallel.failures import CollectiveError, PeerFailedError, on_every_rank
from sae_dist.run_dir import checkpoint_name, latest_checkpoint
from sae_dist.train import checkpoint as ckpt
from sae_dist.train.preemption import StopRequested
from sae_dist.train.run import train_from_config
from sae_dist.train.trainer import NonFiniteError, Trainer
from sae_dist.validation import to_run_config
from tests.train.faults import FaultySource, poison, stall

register_configs()

CONF = Path(__file__).resolve().parents[2] / "conf"
JOB = ["name=restart", "data=synthetic", "data.d_model=32", "sae.num_latents=256", "sae.num_experts=4", "sae.k=4",
       "trainer.batch_size=128", "trainer.steps=20", "trainer.log_every=5", "trainer.checkpoint_every=5",
       "trainer.progress=false", "trainer.tensorboard=false", "parallel.timeout_s=30"]
"""The overrides of the torchrun job of test_restarts.py, and of its uninterrupted twin here."""


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=list(overrides)))


def trainer(run, rank: int, faults: dict | None = None) -> Trainer:
    ctx = ExpertParallelContext.from_config(run, "cpu")
    source = FaultySource(SyntheticSource.from_config(run.data, run.trainer.seed, rank), faults or {})
    return Trainer(run, source, ctx)


def check_nan_on_one_rank(folder: Path, rank: int) -> None:
    """NaN rows in rank 1's batch only: both ranks stop at the same step, name the bad one, write nothing."""
    run = compose_run(*JOB, f"trainer.out_dir={folder / 'nan'}", "trainer.checkpoint_every=10")
    t = trainer(run, rank, {3: poison(5)} if rank == 1 else {})
    with pytest.raises(NonFiniteError, match="^step 3: NaN or inf .* stopped at step 5 without writing"):
        t.train()
    assert all(bool(torch.isfinite(p).all()) for p in t.model.parameters())
    assert latest_checkpoint(run.trainer.out_dir) is None


def check_save_fails_on_one_rank(folder: Path, rank: int) -> None:
    """A full disk on rank 1 only: every rank fails the save, rank 1 alone reports it, nothing partial remains."""
    run = compose_run(*JOB, f"trainer.out_dir={folder / 'full'}", "trainer.steps=10")
    save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if rank == 1 and "step_00000010" in str(path):
            raise OSError(28, "No space left on device", str(path))
        return save(obj, path, *args, **kwargs)

    torch.save = full_disk
    try:
        with pytest.raises(ckpt.CheckpointWriteError) as info:
            trainer(run, rank).train()
    finally:
        torch.save = save
    assert info.value.report_here == (rank == 1)
    if rank == 1:
        assert "No space left on device" in str(info.value) and "step_00000005 is intact" in str(info.value)
    root = Path(run.trainer.out_dir) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000005"]


def check_error_on_one_rank(rank: int) -> None:
    def prepare():
        if rank == 1:
            raise ConfigError("rank 1's data shard is empty")
        return "ok"

    with pytest.raises(ConfigError if rank == 1 else PeerFailedError) as info:
        on_every_rank(prepare)
    assert getattr(info.value, "report_here") == (rank == 1)


def check_stalled_rank(folder: Path, rank: int) -> None:
    """Rank 1 stalls (as under SIGSTOP) before step 3: rank 0 fails within parallel.timeout_s, naming the
    collective it was in, and so does rank 1 once it wakes; nobody hangs."""
    run = compose_run(*JOB, f"trainer.out_dir={folder / 'stall'}", "parallel.timeout_s=2")
    t = trainer(run, rank, {3: stall(6)} if rank == 1 else {})
    start = time.perf_counter()
    with pytest.raises(CollectiveError) as info:
        t.train()
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert "\n" not in message and "another rank died or stalled (parallel.timeout_s=2)" in message
    if rank == 0:
        assert message.startswith("collective all_to_all_single (all_to_all.py:") and "during step 3" in message
        assert elapsed < 30, elapsed


def check_sweep_stop_on_one_rank(folder: Path, rank: int) -> None:
    """SIGUSR1 to rank 1 while the second SAE of a sweep takes step 3: at the next logging step (5) the ranks agree,
    and every member on every rank checkpoints step 5 and stops (checkpoint_every=10: formerly the second member
    alone stopped, and the sweep could not resume); the continued sweep ends as the unbroken one bit for bit."""

    def sweep(name: str) -> list[Trainer]:
        run = compose_run(*JOB, f"trainer.out_dir={folder / name}", "trainer.steps=10", "trainer.checkpoint_every=10")
        run.sweep = [{"sae.k": 4}, {"sae.k": 8}]
        results = train_from_config(run, ExpertParallelContext.from_config(run, "cpu"), eval_batches=1)
        return [result["trainer"] for result in results]

    unbroken = sweep("sweep_unbroken")
    second = unbroken[1].run.name
    train_step = Trainer.train_step

    def signalled(self, x_TD):
        if rank == 1 and self.run.name == second and self.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return train_step(self, x_TD)

    Trainer.train_step = signalled
    try:
        with pytest.raises(StopRequested, match="after step 5; checkpoints step_00000005 written for 2 SAEs"):
            sweep("sweep_stopped")
    finally:
        Trainer.train_step = train_step
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    for reference in unbroken:
        assert latest_checkpoint(folder / "sweep_stopped" / reference.run.name).name == checkpoint_name(5)
    for resumed, reference in zip(sweep("sweep_stopped"), unbroken, strict=True):
        for name, tensor in reference.model.state_dict().items():
            assert torch.equal(resumed.model.state_dict()[name], tensor), name


def two_ranks(rank: int, world: int, folder: Path, check) -> None:
    with check("baseline"):
        run = compose_run(*JOB, f"trainer.out_dir={folder / 'baseline'}")
        train_from_config(run, ExpertParallelContext.from_config(run, "cpu"), eval_batches=1)
    with check("nan_on_one_rank"):
        check_nan_on_one_rank(folder, rank)
    with check("save_fails_on_one_rank"):
        check_save_fails_on_one_rank(folder, rank)
    with check("error_on_one_rank"):
        check_error_on_one_rank(rank)
    with check("sweep_stop_on_one_rank"):
        check_sweep_stop_on_one_rank(folder, rank)
    with check("stalled_rank"):  # last: the timed-out groups are not used again
        check_stalled_rank(folder, rank)
