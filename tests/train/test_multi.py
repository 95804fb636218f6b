"""Several SAEs from one stream (`run.sweep`): each equals the same SAE trained alone on the same stream."""

import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sae_dist.cli import one_line_errors
from sae_dist.config import ConfigError, RunConfig
from sae_dist.run_dir import checkpoint_name, latest_checkpoint, read_metrics
from sae_dist.train.identity import RunDirectoryError
from sae_dist.train.preemption import REQUEUE_EXIT_STATUS, StopRequested
from sae_dist.train.run import train_from_config
from sae_dist.train.trainer import Trainer
from sae_dist.validation import sweep_members, validate
from tests.conftest import small_run
from tests.data.conftest import minilm, tiny_gpt2_dir  # noqa: F401 - the tiny random GPT-2 and its tokenizer


def assert_same_weights(a, b) -> None:
    for name, tensor in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def alone(member: RunConfig, tmp_path) -> "Trainer":  # noqa: F821
    run = replace(member, trainer=replace(member.trainer, out_dir=str(tmp_path / "alone" / member.name)))
    return train_from_config(run, eval_batches=1)["trainer"]


def test_sweep_members_equal_separate_runs(make_run, tmp_path):
    run = make_run(steps=12, checkpoint_every=6)
    run.sweep = [{"sae": {"k": 4}}, {"sae.k": 8, "sae.num_latents": 128, "name": "wide_k8"}, {"trainer.lr": 1e-3}]
    results = train_from_config(run, eval_batches=1)
    members = sweep_members(run)
    assert [r["trainer"].run.name for r in results] == [m.name for m in members]
    assert members[1].name == "wide_k8" and members[0].name == "switch_M256_N4_k4_L8"
    assert members[2].name.endswith("_L8_lr=0.001")  # a setting outside the descriptor names itself
    for result, member in zip(results, members, strict=True):
        trainer = result["trainer"]
        assert trainer.run_dir == tmp_path / "run" / member.name and (trainer.run_dir / "config.yaml").is_file()
        assert [r["step"] for r in read_metrics(trainer.run_dir)] == [5, 10, 12]
        assert latest_checkpoint(trainer.run_dir).name == "step_00000012"
        assert_same_weights(trainer, alone(member, tmp_path))


def test_sweep_over_hook_sites_reads_the_lm_once(tiny_gpt2_dir, make_run, tmp_path):  # noqa: F811
    run = make_run(steps=4, checkpoint_every=4)
    run.data.source, run.data.dataset, run.data.ctx_len, run.data.shuffle_buffer = "lm", "pydoc-topics", 32, 512
    run.model.name, run.model.path, run.model.layer = "tiny", str(tiny_gpt2_dir), 1
    run.sweep = [{"model.layer": 2}, {"model.layer": 0, "sae.k": 4}]
    validate(run)
    results = train_from_config(run, eval_batches=1)
    assert results[0]["trainer"].source.stream.source.d_model == 2 * 64  # one pass reads both blocks
    for result, member in zip(results, sweep_members(run), strict=True):
        assert_same_weights(result["trainer"], alone(member, tmp_path))


def test_a_sweep_of_transcoders_equals_its_members_alone(tiny_gpt2_dir, make_run, tmp_path):  # noqa: F811
    """Transcoders of blocks 0 and 1 (a glob pair), one of block 1's MLP input to its 256-wide hidden layer, and an SAE
    of block 2: one pass reads their sites and each member trains as it would alone, bit for bit."""
    run = make_run(steps=3, checkpoint_every=3)
    run.data.source, run.data.dataset, run.data.ctx_len, run.data.shuffle_buffer = "lm", "pydoc-topics", 32, 512
    run.model.name, run.model.path, run.model.layer, run.sae.d_out = "tiny", str(tiny_gpt2_dir), 2, 64
    run.sweep = [{"model": {"hookpoint": "mlp_in.*[01]", "target_hookpoint": "mlp_out.*[01]"}},
                 {"model": {"hookpoint": "mlp_in.1", "target_hookpoint": "h.1.mlp.c_fc"}, "sae": {"d_out": 256}},
                 {"sae": {"d_out": None}}]
    validate(run)
    results = train_from_config(run, eval_batches=1)
    trainers = [result["trainer"] for result in results]
    assert [(t.run.model.hookpoint, t.run.model.target_hookpoint, t.run.sae.d_out) for t in trainers] == [
        ("mlp_in.0", "mlp_out.0", 64), ("mlp_in.1", "mlp_out.1", 64), ("mlp_in.1", "h.1.mlp.c_fc", 256),
        (None, None, None)]
    assert trainers[0].source.stream.source.d_model == 4 * 64 + 256 + 64  # one pass, every site once
    for trainer in trainers:
        assert_same_weights(trainer, alone(trainer.run, tmp_path))


def test_resume_starts_every_member_from_a_step_they_all_have(make_run, tmp_path):
    whole = make_run(steps=12, checkpoint_every=4, keep_checkpoints=3, out_dir=str(tmp_path / "whole"))
    whole.sweep = [{"sae.k": 4}, {"sae.k": 8}]
    finished = train_from_config(whole, eval_batches=1)
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    # A crash between two members' saves of step 8: member 0 has saved it, member 1 has not.
    for member, keep in zip(sweep_members(whole), ("step_00000008", "step_00000004"), strict=True):
        checkpoints = tmp_path / "cut" / member.name / "checkpoints"
        for folder in checkpoints.glob("step_*"):
            if folder.name > keep:
                shutil.rmtree(folder)
        (checkpoints / "latest").write_text(keep)
    resumed = replace(whole, trainer=replace(whole.trainer, out_dir=str(tmp_path / "cut"), resume="true"))
    results = train_from_config(resumed, eval_batches=1)
    for result, reference in zip(results, finished, strict=True):
        assert result["trainer"].step == 12
        assert_same_weights(result["trainer"], reference["trainer"])
    # Every member is a run of its own to the identity checks: a new start over checkpoints, or another k, is refused.
    with pytest.raises(RunDirectoryError, match="holds checkpoints"):
        train_from_config(replace(resumed, trainer=replace(resumed.trainer, resume="false")), eval_batches=1)
    changed = replace(resumed, sweep=[{"sae.k": 4}, {"sae.k": 8, "name": "switch_M256_N4_k8_L8", "sae.lb_alpha": 1.0}])
    with pytest.raises(RunDirectoryError, match=r"switch_M256_N4_k8_L8 holds a run defined otherwise: sae.lb_alpha 0.1 -> 1.0"):
        train_from_config(changed, eval_batches=1)


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ([{"data": {"ctx_len": 64}}], r"sweep\[0\].data.ctx_len cannot differ"),
        ([{"trainer.batch_size": 64}], r"sweep\[0\].trainer.batch_size cannot differ"),
        ([{"trainer.lr_decay_frac": 0.5}], r"sweep\[0\].trainer.lr_decay_frac cannot differ"),
        ([{"sae.k": 4}, {"sae.k": 4}], "sweep names must differ"),
        ([{"sae.kk": 4}], r"sweep\[0\]: sae.kk"),
        ([{"model.layer": 2}], "needs data.source=lm"),
        ([{"model": {"target_hookpoint": "mlp_out.3"}, "sae.d_out": 64}],
         "sweep: model.target_hookpoint=mlp_out.3 needs data.source=lm"),
        ([{"sae.d_out": 64}, {"sae.d_out": 32}],
         (r"sweep: sae.d_out=\[64, 32\] must be one value: the SAEs share one stream of rows \[x \| y\] of "
          "data.source=synthetic")),
    ],
)
def test_bad_sweeps_are_one_line_errors(make_run, sweep, message):
    run = make_run()
    run.sweep = sweep
    with pytest.raises(ConfigError, match=message) as info:
        validate(run)
    assert "\n" not in str(info.value)


STOPPED_SWEEP = [{"sae.k": 4}, {"sae.k": 8}, {"sae.num_latents": 128}]


@pytest.fixture(scope="module")
def unbroken_sweep(tmp_path_factory) -> list[Trainer]:
    """The trainers of the 3-member sweep of the stop tests, 12 steps that nothing interrupted."""
    run = small_run(tmp_path_factory.mktemp("unbroken_sweep"), steps=12, checkpoint_every=6, keep_checkpoints=1)
    run.sweep = STOPPED_SWEEP
    return [result["trainer"] for result in train_from_config(run, eval_batches=1)]


@pytest.mark.parametrize(
    ("method", "member", "steps_done", "stop_step"),
    [("train_step", 1, 6, 8), ("save", 0, 6, 7)],
    ids=["during_member_1s_step", "between_two_members_saves"],
)
def test_stop_signal_stops_every_member_after_one_step_and_the_resume_is_exact(
    make_run, unbroken_sweep, monkeypatch, capsys, method, member, steps_done, stop_step
):
    """SIGUSR1 while member 1 takes step 7 (member 0 has taken it, member 2 has not), or after member 0 has saved
    checkpoint 6 and before member 1 saves it: every member stops after the first step all of them begin after the
    signal (8, 7) and checkpoints it, the process stops with status 75 and one line, and the resumed sweep ends bit
    for bit as the unbroken one (each member keeps one checkpoint: formerly the last member alone stopped, a step
    ahead, with its checkpoint 6 rotated away, so the sweep could not resume; and the handler outlived the sweep)."""
    run = make_run(steps=12, checkpoint_every=6, keep_checkpoints=1)
    run.sweep = STOPPED_SWEEP
    target = sweep_members(run)[member].name
    original = getattr(Trainer, method)

    def signalled(self, *args):
        result = original(self, *args)
        if self.run.name == target and self.step == steps_done:
            os.kill(os.getpid(), signal.SIGUSR1)
        return result

    monkeypatch.setattr(Trainer, method, signalled)
    with pytest.raises(StopRequested) as info:
        train_from_config(run, eval_batches=1)
    monkeypatch.setattr(Trainer, method, original)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL, "the handler outlived the sweep"
    assert info.value.step == stop_step
    for trainer in unbroken_sweep:
        assert latest_checkpoint(Path(run.trainer.out_dir) / trainer.run.name).name == checkpoint_name(stop_step)
    with pytest.raises(SystemExit) as exit_info, one_line_errors():
        raise info.value
    assert exit_info.value.code == REQUEUE_EXIT_STATUS
    err = capsys.readouterr().err
    assert f"stopped by SIGUSR1 after step {stop_step}; checkpoints {checkpoint_name(stop_step)} written for 3 SAEs" in err
    assert f"the same command with trainer.out_dir={run.trainer.out_dir} (trainer.resume=auto)" in err
    assert err.count("\n") == 1, err
    for result, reference in zip(train_from_config(run, eval_batches=1), unbroken_sweep, strict=True):
        assert result["trainer"].step == 12
        assert_same_weights(result["trainer"], reference)


class HardKill(BaseException):
    """Stands for a SIGKILL: nothing of the sweep runs after it."""


def test_a_hard_kill_between_two_members_saves_resumes_with_one_checkpoint_kept(make_run, unbroken_sweep,
                                                                               monkeypatch):
    """keep_checkpoints=1, the process killed after member 0 has written checkpoint 12 and before member 1 has:
    member 0 keeps checkpoint 6 beside it (rotation waits for every member; formerly it was deleted, and no step was
    left in common), the resumed sweep ends bit for bit as the unbroken one, and each member then keeps one."""
    run = make_run(steps=12, checkpoint_every=6, keep_checkpoints=1)
    run.sweep = STOPPED_SWEEP
    members = [member.name for member in sweep_members(run)]
    original = Trainer.save

    def killed_before_member_1_saves(self):
        if self.run.name == members[1] and self.step == 12:
            raise HardKill
        return original(self)

    monkeypatch.setattr(Trainer, "save", killed_before_member_1_saves)
    with pytest.raises(HardKill):
        train_from_config(run, eval_batches=1)
    monkeypatch.setattr(Trainer, "save", original)
    out = Path(run.trainer.out_dir)
    held = {name: sorted(p.name for p in (out / name / "checkpoints").glob("step_*")) for name in members}
    assert held == {members[0]: [checkpoint_name(6), checkpoint_name(12)], members[1]: [checkpoint_name(6)],
                    members[2]: [checkpoint_name(6)]}
    for result, reference in zip(train_from_config(run, eval_batches=1), unbroken_sweep, strict=True):
        assert result["trainer"].step == 12
        assert_same_weights(result["trainer"], reference)
    for name in members:
        assert [p.name for p in (out / name / "checkpoints").glob("step_*")] == [checkpoint_name(12)]
