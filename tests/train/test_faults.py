"""Faults in one process: non-finite batches, damaged checkpoints, full and read-only disks, leftovers of killed
saves, and SIGTERM / SIGUSR1 (the multi-rank and torchrun cases are in test_restarts.py).

Formerly: NaN in 12 of 8,192 rows turned every weight into NaN and the run exited 0, and checkpoint rotation then
deleted the good checkpoints and kept the NaN ones; a full disk gave a 72-line traceback that never said "No space
left on device" and left the partial folder behind; a corrupted checkpoint file loaded silently."""

from __future__ import annotations

import errno
import shlex
import shutil
import signal
import threading
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from sae_dist import load_sae
from sae_dist.cli import one_line_errors
from sae_dist.data import build_activation_source
from sae_dist.run_dir import (
    STATE_DIR,
    CheckpointError,
    latest_checkpoint,
    read_checkpoint_config,
    read_metrics,
    verify_files,
)
from sae_dist.train import checkpoint as ckpt
from sae_dist.train.run import train_from_config
from sae_dist.train.preemption import REQUEUE_EXIT_STATUS, StopRequested
from sae_dist.train.nonfinite import NO_UPDATE_EXIT_STATUS, NoUpdateError
from sae_dist.train.trainer import NonFiniteError, Trainer
from tests.conftest import small_run
from tests.train.faults import FaultySource, poison, send

INF = float("inf")


def trainer_for(run, faults=None) -> Trainer:
    return Trainer(run, FaultySource(build_activation_source(run), faults or {}))


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def test_nan_batch_stops_the_run_naming_the_step_and_writes_nothing(make_run, capsys):
    run = make_run(steps=20, log_every=5, checkpoint_every=5)
    trainer = trainer_for(run, {7: poison(12)})
    with pytest.raises(NonFiniteError) as info:
        trainer.train()
    message = str(info.value)
    assert message.startswith("step 7: NaN or inf") and "stopped at step 10" in message and "\n" not in message
    assert "step_00000005" in message and "trainer.on_nonfinite=skip" in message
    assert latest_checkpoint(run.trainer.out_dir).name == "step_00000005"
    assert not (latest_checkpoint(run.trainer.out_dir).parent / "step_00000010").exists()
    assert all_finite(trainer.model.parameters())
    with pytest.raises(SystemExit) as exit_info, one_line_errors():
        raise info.value
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: step 7: NaN or inf")


def test_skipped_steps_apply_no_update_and_rotation_keeps_good_checkpoints(make_run):
    """NaN and inf rows late in a run with keep_checkpoints=2 (main kept only NaN checkpoints)."""
    run = make_run(steps=16, log_every=8, checkpoint_every=4, keep_checkpoints=2, on_nonfinite="skip")
    trainer = trainer_for(run, {9: poison(3), 13: poison(1, INF)})
    step = Trainer.train_step
    seen = {}

    def watched(self, x_TD):
        if self.step + 1 == 9:
            seen["before"] = optimizer_state(self)
        result = step(self, x_TD)
        if self.step + 1 == 9:
            seen["after"] = optimizer_state(self)
        return result

    Trainer.train_step = watched
    try:
        trainer.train()
    finally:
        Trainer.train_step = step
    for key, before in seen["before"].items():
        assert torch.equal(seen["after"][key], before), f"the skipped step changed {key}"
    assert trainer.nonfinite_steps == 2 and read_metrics(run.trainer.out_dir)[-1]["nonfinite_steps"] == 2
    adam_steps = {float(state["step"]) for state in trainer.optimizer.state.values()}
    assert adam_steps == {14.0}
    kept = sorted(p.name for p in (trainer.run_dir / "checkpoints").glob("step_*"))
    assert kept == ["step_00000012", "step_00000016"]
    for name in kept:
        assert all_finite(load_sae(trainer.run_dir / "checkpoints" / name).parameters())


def crash(x_TD):
    raise KeyboardInterrupt("killed")


def optimizer_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Adam moments and step, the dead-latent counters and every parameter (decoder rows included: they are
    renormalised after an update, not before the next step)."""
    state = {"dead": trainer.dead.tokens_since_fired_L.clone()}
    for name, param in trainer.model.named_parameters():
        state[name] = param.detach().clone()
        for key, value in trainer.optimizer.state[param].items():
            state[f"{name}.{key}"] = value.clone()
    return state


def test_an_all_nan_first_batch_never_reaches_the_biases(make_run):
    run = make_run(steps=10, on_nonfinite="skip")
    trainer = trainer_for(run, {1: poison(256)})
    trainer.train()
    assert trainer.nonfinite_steps == 1 and all_finite(trainer.model.parameters())
    assert latest_checkpoint(run.trainer.out_dir).name == "step_00000010"


def all_nan_from(batch: int, steps: int) -> dict:
    """Every row of every batch from `batch` on NaN (batch_size 256)."""
    return {b: poison(256) for b in range(batch, steps + 1)}


def test_a_run_that_skips_every_step_fails_and_publishes_no_checkpoint(make_run, capsys):
    """All-NaN data under skip formerly exited 0 with `MSE nan` and published its untrained weights as `latest`."""
    run = make_run(steps=20, log_every=5, checkpoint_every=5, on_nonfinite="skip")
    trainer = trainer_for(run, all_nan_from(1, 20))
    with pytest.raises(NoUpdateError) as info:
        trainer.train()
    message = str(info.value)
    assert message.startswith("no update applied: every step of the run skipped for NaN or inf") and "\n" not in message
    assert "20 steps since step 1, 20 in this run" in message and "no checkpoint was written" in message
    assert "check the activations" in message
    assert latest_checkpoint(run.trainer.out_dir) is None
    assert not list((trainer.run_dir / "checkpoints").glob("step_*"))
    with pytest.raises(SystemExit) as exit_info, one_line_errors():
        raise info.value
    err = capsys.readouterr().err
    assert exit_info.value.code == NO_UPDATE_EXIT_STATUS == 65 and err.startswith("error: no update applied")
    assert len(err.strip().splitlines()) == 1


def test_a_stop_signal_before_any_update_requeues_without_checkpointing(make_run, capsys):
    """SIGTERM at step 3 of an all-NaN run is a preemption like any other (exit 75, so SLURM requeues; it formerly
    exited 65, which is for a run that ended), and writes no checkpoint of untouched weights."""
    run = make_run(steps=20, log_every=10, checkpoint_every=10, on_nonfinite="skip")
    faults = all_nan_from(1, 20)
    faults[3] = lambda x_TD: (send(signal.SIGTERM)(x_TD), poison(256)(x_TD))[1]
    trainer = trainer_for(run, faults)
    with pytest.raises(StopRequested) as info:
        trainer.train()
    assert info.value.step == 3 and info.value.checkpoint is None and trainer.nonfinite_steps == 3
    assert latest_checkpoint(run.trainer.out_dir) is None
    assert not list((trainer.run_dir / "checkpoints").glob("step_*"))
    with pytest.raises(SystemExit) as exit_info, one_line_errors():
        raise info.value
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == REQUEUE_EXIT_STATUS == 75
    assert err == [(f"stopped by SIGTERM after step 3; no checkpoint written: every step so far was skipped for "
                       f"NaN or inf, no update applied; the same command with trainer.out_dir={run.trainer.out_dir} "
                       "(trainer.resume=auto) continues the run")]


def test_a_sweep_stopped_before_any_update_requeues_without_checkpointing(make_run, monkeypatch):
    """The SAEs of a sweep on all-NaN data stop together on SIGUSR1 and none writes a checkpoint."""
    run = make_run(steps=12, on_nonfinite="skip")
    run.sweep = [{"sae.k": 4}, {"sae.k": 8}]
    train_step = Trainer.train_step

    def all_nan_step(self, x_TD):
        if self.step + 1 == 3:
            send(signal.SIGUSR1)(x_TD)
        return train_step(self, torch.full_like(x_TD, float("nan")))

    monkeypatch.setattr(Trainer, "train_step", all_nan_step)
    with pytest.raises(StopRequested) as info:
        train_from_config(run)
    message = str(info.value)  # the signal of step 3 is held to the next round of steps
    assert info.value.step == 4 and info.value.checkpoint is None
    assert "no checkpoint written for the sweep in" in message and "(2 SAEs have applied no update)" in message
    assert not list(Path(run.trainer.out_dir).rglob("step_*"))


def test_100_skipped_steps_in_a_row_fail_the_run_and_keep_the_last_checkpoint(make_run):
    """Good steps 1 to 30, then NaN: the checkpoint of step 100 (after applied steps) stays `latest`; the run stops
    at the check of step 130, the 100th skipped step, without writing it."""
    run = make_run(steps=150, log_every=10, checkpoint_every=50, keep_checkpoints=1, on_nonfinite="skip")
    trainer = trainer_for(run, all_nan_from(31, 150))
    with pytest.raises(NoUpdateError, match="the last 100 steps in a row skipped .* "
                       r"\(100 steps since step 31, 100 in this run\); stopped at step 130 "
                       r"\(the last checkpoint is step_00000100\)"):
        trainer.train()
    assert trainer.step == 130
    assert [p.name for p in (trainer.run_dir / "checkpoints").glob("step_*")] == ["step_00000100"]
    assert latest_checkpoint(run.trainer.out_dir).name == "step_00000100"
    assert all_finite(load_sae(latest_checkpoint(run.trainer.out_dir)).parameters())


def test_skipped_steps_in_a_row_count_across_a_resume(make_run):
    """The trailing skipped steps are saved with the checkpoint: 70 before it and 30 after make 100."""
    run = make_run(steps=100, log_every=10, checkpoint_every=100, on_nonfinite="skip")
    trainer_for(run, all_nan_from(31, 100)).train()
    longer = make_run(steps=200, log_every=10, checkpoint_every=100, on_nonfinite="skip", resume="auto")
    resumed = trainer_for(longer, all_nan_from(1, 100))  # the source counts batches from the resume
    with pytest.raises(NoUpdateError, match=r"100 steps since step 31, 100 in this run\); stopped at step 130"):
        resumed.train()
    assert latest_checkpoint(run.trainer.out_dir).name == "step_00000100"


def test_weights_that_are_not_finite_are_never_saved(make_run):
    run = make_run(steps=10, keep_checkpoints=1)
    trainer = trainer_for(run)
    trainer.train()
    with torch.no_grad():
        next(trainer.model.parameters())[0] = float("nan")
    with pytest.raises(ckpt.NonFiniteWeightsError, match="checkpoint not written, earlier checkpoints kept"):
        trainer.save()
    assert [p.name for p in (trainer.run_dir / "checkpoints").glob("step_*")] == ["step_00000010"]
    assert latest_checkpoint(trainer.run_dir).name == "step_00000010"


def test_a_corrupted_training_state_is_refused_on_resume(make_run, tmp_path):
    run = make_run(steps=10)
    trainer_for(run).train()
    shard = next((latest_checkpoint(run.trainer.out_dir) / STATE_DIR).glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    run.trainer.steps = 20
    with pytest.raises(CheckpointError, match=f"{shard.name} is corrupted: its SHA-256 differs") as info:
        trainer_for(run).train()
    assert "\n" not in str(info.value)


def test_a_full_disk_during_a_save_is_one_line_and_leaves_nothing_behind(make_run, monkeypatch):
    run = make_run(steps=20, checkpoint_every=10)
    save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "step_00000020" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        trainer_for(run).train()
    message = str(info.value)
    assert "cannot write checkpoint step_00000020: No space left on device" in message and "\n" not in message
    assert "the partial checkpoint was removed and step_00000010 is intact" in message
    root = latest_checkpoint(run.trainer.out_dir).parent
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000010"]
    verify_files(root / "step_00000010")


def test_ctrl_c_during_a_save_or_a_load_stays_an_interruption_and_leaves_nothing_behind(make_run, monkeypatch):
    """DCP wraps what a rank raised, KeyboardInterrupt too, into a CheckpointException (a traceback, where Ctrl-C
    is one line): a save raises KeyboardInterrupt again, after removing the partial checkpoint; so does a resume's
    load, which changes nothing."""
    run = make_run(steps=20, checkpoint_every=10)
    write_data = FileSystemWriter.write_data

    def interrupted(self, plan, planner):
        if "step_00000020" in str(self.path):
            raise KeyboardInterrupt
        return write_data(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", interrupted)
    with pytest.raises(KeyboardInterrupt) as info:
        trainer_for(run).train()
    assert isinstance(info.value.__cause__, CheckpointException)
    root = latest_checkpoint(run.trainer.out_dir).parent
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000010"]
    verify_files(root / "step_00000010")

    def interrupted_read(self, plan, planner):
        raise KeyboardInterrupt

    monkeypatch.setattr(FileSystemReader, "read_data", interrupted_read)
    with pytest.raises(KeyboardInterrupt):
        trainer_for(run).train()  # resumes from step 10
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000010"]
    verify_files(root / "step_00000010")


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of a 12-step run that nothing interrupted."""
    trainer = trainer_for(small_run(tmp_path_factory.mktemp("unbroken"), steps=12))
    trainer.train()
    return trainer.model.state_dict()


def assert_same_weights(trainer: Trainer, expected: dict[str, torch.Tensor]) -> None:
    for name, tensor in expected.items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), name


def test_leftovers_of_killed_saves_are_removed_and_resume_is_exact(make_run, unbroken):
    """A temporary folder (killed while writing) and a checkpoint renamed into place but never published (killed
    before `latest` was replaced): the run resumes from `latest`, removes both and ends as an unbroken run."""
    run = make_run(steps=12)
    with pytest.raises(KeyboardInterrupt):
        trainer_for(run, {11: crash}).train()
    root = latest_checkpoint(run.trainer.out_dir).parent
    shutil.copytree(root / "step_00000010", root / "step_00000012")  # "published" without `latest`
    (root / "step_00000011.tmp" / "state").mkdir(parents=True)
    resumed = trainer_for(run)
    resumed.train()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000010", "step_00000012"]
    assert read_checkpoint_config(root / "step_00000012")[2] == 12
    assert_same_weights(resumed, unbroken)


def test_stop_signal_checkpoints_the_step_and_the_resume_is_exact(make_run, unbroken, capsys):
    """SIGUSR1 (SLURM's warning) in one process: the run stops after the step, with its checkpoint, exit status 75,
    and the continuation ends as the unbroken run (SIGTERM: the torchrun test in test_restarts.py)."""
    run = make_run(steps=12)
    with pytest.raises(StopRequested) as info:
        trainer_for(run, {7: send(signal.SIGUSR1)}).train()
    assert info.value.step == 7 and info.value.checkpoint.name == "step_00000007"
    assert latest_checkpoint(run.trainer.out_dir).name == "step_00000007"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL, "the handler outlived the run"
    with pytest.raises(SystemExit) as exit_info, one_line_errors():
        raise info.value
    assert exit_info.value.code == REQUEUE_EXIT_STATUS
    err = capsys.readouterr().err
    assert "stopped by SIGUSR1 after step 7" in err
    assert f"the same command with trainer.out_dir={run.trainer.out_dir} (trainer.resume=auto) continues" in err
    resumed = trainer_for(run)
    resumed.train()
    assert_same_weights(resumed, unbroken)


@pytest.mark.parametrize("sweep", [None, [{"sae.k": 4}, {"sae.k": 8}]], ids=["run", "sweep"])
@pytest.mark.parametrize("fault", ["signal", "nan"])
def test_a_run_that_stops_early_stops_its_prefetch_thread(make_run, monkeypatch, sweep, fault):
    """A stop signal or an error ends `train_from_config` with the prefetch thread stopped. Before, the daemon
    thread outlived the run: the quickstart stopped by SIGTERM wrote its checkpoint, then the interpreter ended the
    thread inside an LM forward, and the process aborted (`terminate called without an active exception`, status
    134) in place of exiting 75."""
    run = make_run(steps=12)
    run.sweep = sweep
    assert run.data.prefetch > 0
    train_step = Trainer.train_step

    def faulty_step(self, x_TD):
        if self.step + 1 == 5 and fault == "signal":
            send(signal.SIGUSR1)(x_TD)
        elif self.step + 1 == 5:
            x_TD = poison(3)(x_TD)
        return train_step(self, x_TD)

    monkeypatch.setattr(Trainer, "train_step", faulty_step)
    before = set(threading.enumerate())  # other tests' trainers may hold producers of their own
    with pytest.raises(StopRequested if fault == "signal" else NonFiniteError):
        train_from_config(run)
    assert not [t for t in set(threading.enumerate()) - before if t.name == "activation-prefetch"]


@pytest.mark.parametrize("folder", ["runs/quickstart/2026-11-26_06-56-32", "runs/q/2026/sae.k=16,sae.num_experts=4"])
def test_the_stop_line_names_a_folder_that_hydra_reads_back(folder):
    """The trainer.out_dir that the stop line offers parses back to the run's folder, also a multirun job's, whose
    '=' and ',' Hydra reads as syntax unless quoted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    message = str(StopRequested("SIGTERM", 3, Path(folder) / "checkpoints" / "step_00000003"))
    words = shlex.split(message.split("the same command with ", 1)[1].split(" (trainer.resume=auto)")[0])
    (override,) = OverridesParser.create().parse_overrides(words)
    assert override.key_or_group == "trainer.out_dir" and override.value() == folder


def test_a_kill_while_rotating_leaves_no_half_deleted_checkpoint(make_run, monkeypatch):
    """Formerly a kill inside rotation left step_N with some of its files deleted, under its own name, until the next
    rotation; now the old checkpoint is renamed away first, and the next start removes the rest."""
    run = make_run(steps=3, checkpoint_every=1, keep_checkpoints=5)
    Trainer(run, build_activation_source(run)).train()
    root = Path(run.trainer.out_dir) / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == [f"step_0000000{i}" for i in (1, 2, 3)]
    real_rmtree = shutil.rmtree

    def killed_halfway(path, ignore_errors=False):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        if not files:
            return real_rmtree(path, ignore_errors=ignore_errors)
        files[0].unlink()
        raise KeyboardInterrupt  # the kill

    monkeypatch.setattr(shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.rotate_checkpoints(root, keep=1, current_step=3)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000001.tmp", "step_00000002", "step_00000003"]
    for name in ("step_00000002", "step_00000003"):
        verify_files(root / name)
    assert ckpt.remove_partial_checkpoints(run.trainer.out_dir) == [root / "step_00000001.tmp"]
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000003"]
