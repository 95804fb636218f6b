"""A run keeps its identity: on resume the saved config is the truth, meaning-changing overrides are refused with
one line listing each difference, harmless ones are recorded in the resume history, never over config.yaml.

Formerly, `trainer.resume=true` took the model and settings from the command line and rewrote config.yaml, a
changed `sae.num_latents` gave a raw traceback after config.yaml was rewritten, `trainer.resume=true` on a folder
without a checkpoint silently started at step 0, and no run said "resumed from step N"."""

from __future__ import annotations

import json

import pytest
import yaml
from hydra import compose, initialize_config_dir

from sae_dist import validation
from sae_dist.config import register_configs
from sae_dist.run_dir import latest_checkpoint, read_checkpoint_config, read_history, read_metrics
from sae_dist.train.identity import RunDirectoryError, continue_config, explicit_settings
from sae_dist.train.run import train_from_config
from sae_dist.validation import to_run_config
from tests.conftest import small_run
from tests.test_config import CONF

register_configs()

FIRST = ["data=synthetic", "data.d_model=32", "sae.num_latents=512", "sae.num_experts=4", "sae.k=4",
         "trainer.batch_size=128", "trainer.steps=4", "trainer.log_every=2", "trainer.checkpoint_every=2",
         "trainer.progress=false", "trainer.tensorboard=false", "trainer.lr=0.005", "recipe=paper"]


def train_cli(*overrides: str, eval_batches: int = 1) -> dict:
    """What `launch/train.py OVERRIDES` does in one process (the overrides also decide what a resume compares)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        run = to_run_config(compose(config_name="config", overrides=list(overrides)))
    return train_from_config(run, eval_batches=eval_batches, overrides=list(overrides))


def snapshot(run_dir) -> dict[str, bytes]:
    """Every file of a run folder, by relative path, except the logs a resume appends to."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in ("metrics.jsonl", "resume_history.jsonl")}


def test_resume_keeps_the_saved_config_and_records_allowed_changes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    out = f"trainer.out_dir={run_dir}"
    train_cli(*FIRST, out)
    config_yaml = (run_dir / "config.yaml").read_bytes()
    capsys.readouterr()

    # Only the folder and a longer run: every other setting (synthetic data, M = 512, k = 4, ...) comes from the run,
    # not from the command's defaults (the quickstart's MiniLM, M = 6144, k = 32).
    result = train_cli(out, "trainer.steps=6")
    trainer = result["trainer"]
    assert trainer.step == 6 and trainer.run.sae.k == 4 and trainer.run.sae.num_latents == 512
    assert trainer.run.data.source == "synthetic" and trainer.run.trainer.steps == 6
    assert "resumed from step 4 (tokens 512) on 1 rank" in capsys.readouterr().out
    assert (run_dir / "config.yaml").read_bytes() == config_yaml
    history = read_history(run_dir)
    assert [event["event"] for event in history] == ["start", "resume"]
    assert (history[0]["step"], history[0]["tokens"], history[1]["step"], history[1]["tokens"]) == (0, 0, 4, 512)
    assert history[1]["message"] == "resumed from step 4 (tokens 512) on 1 rank"
    assert history[1]["changes"] == {"trainer.steps": [4, 6]} and history[1]["world_size"] == 1
    saved, _, step = read_checkpoint_config(latest_checkpoint(run_dir))
    assert step == 6 and saved.trainer.steps == 6
    assert [row["step"] for row in read_metrics(run_dir)] == [2, 4, 6]


def test_meaning_changing_overrides_are_refused_listing_each_difference(tmp_path):
    run_dir = tmp_path / "run"
    out = f"trainer.out_dir={run_dir}"
    train_cli(*FIRST, out)
    before = snapshot(run_dir)
    with pytest.raises(RunDirectoryError) as info:
        train_cli(out, "sae.num_latents=1024", "trainer.seed=3", "trainer.steps=30", "trainer.lr=0.001",
                  "sae.dead_count=routed", "trainer.lr_rule=expert")
    message = str(info.value)
    assert "\n" not in message
    for difference in ("sae.num_latents 512 -> 1024", "trainer.seed 0 -> 3", "trainer.lr 0.005 -> 0.001",
                       'sae.dead_count "tokens" -> "routed"', 'trainer.lr_rule "total" -> "expert"'):
        assert difference in message
    assert "trainer.steps" not in message.split(":")[1].split(";")[0]
    assert snapshot(run_dir) == before, "a refused resume changed the run folder"
    with pytest.raises(RunDirectoryError, match="sae.kind \"switch\" -> \"topk\""):
        train_cli(out, "+experiment=topk_65k")


def test_resume_modes(tmp_path):
    fresh = f"trainer.out_dir={tmp_path / 'fresh'}"
    with pytest.raises(RunDirectoryError, match="trainer.resume=true but trainer.out_dir=.* holds no checkpoint"):
        train_cli(*FIRST, fresh, "trainer.resume=true")
    assert not (tmp_path / "fresh").exists()
    train_cli(*FIRST, fresh)  # auto, the default: starts
    with pytest.raises(RunDirectoryError, match="already holds checkpoints \\(latest step_00000004\\)"):
        train_cli(*FIRST, fresh, "trainer.resume=false")
    result = train_cli(*FIRST, fresh, "trainer.resume=true", "trainer.steps=5")
    assert result["trainer"].step == 5


def test_a_restart_before_the_first_checkpoint_keeps_config_yaml(tmp_path):
    """config.yaml without a checkpoint (a crash before the first save): the same run starts again, another is
    refused, and config.yaml is never rewritten."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = small_run(tmp_path, steps=4, batch_size=128)
    first.trainer.out_dir = str(run_dir)
    from omegaconf import OmegaConf

    from sae_dist.config import as_dict

    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(as_dict(first))))
    text = (run_dir / "config.yaml").read_text()
    other = small_run(tmp_path, steps=4, batch_size=128, lr=1e-3)
    other.trainer.out_dir = str(run_dir)
    with pytest.raises(RunDirectoryError, match="trainer.lr 0.005 -> 0.001"):
        train_from_config(other, eval_batches=1)
    train_from_config(first, eval_batches=1)
    assert (run_dir / "config.yaml").read_text() == text
    assert read_history(run_dir)[0]["event"] == "restart before the first checkpoint"


def test_explicit_settings_of_a_command_line():
    assert explicit_settings(["sae.k=4", "trainer.out_dir=x", "hydra.run.dir=."]) == {"sae.k", "trainer.out_dir"}
    assert explicit_settings(["sae=topk"]) == {"sae"}
    assert explicit_settings(["+experiment=switch_65k"]) == {""}


def test_python_configs_compare_every_setting(tmp_path):
    saved = small_run(tmp_path)
    changed = small_run(tmp_path, steps=99)
    changed.sae.k = 2
    changed.parallel.ep_size = 1
    with pytest.raises(RunDirectoryError, match="sae.k 8 -> 2"):
        continue_config(saved, changed)
    changed.sae.k = 8
    merged, changes = continue_config(saved, changed)
    assert changes == {"trainer.steps": [30, 99], "parallel.ep_size": [None, 1]} and merged == changed


def test_the_readme_capacity_pair_keeps_its_capacity_factor(tmp_path):
    """`torchrun ... parallel.capacity_factor=1.25 trainer.out_dir=runs/ep`, then on 2 ranks `trainer.out_dir=runs/ep
    trainer.resume=true`: main silently continued dropless; the saved capacity factor is kept."""
    saved = small_run(tmp_path)
    saved.parallel.capacity_factor = 1.25
    current = small_run(tmp_path)
    merged, changes = continue_config(saved, current, ["trainer.out_dir=runs/ep", "trainer.resume=true"])
    assert merged.parallel.capacity_factor == 1.25 and changes == {}
    with pytest.raises(RunDirectoryError, match="parallel.capacity_factor 1.25 -> null"):
        continue_config(saved, current, ["trainer.out_dir=runs/ep", "parallel.capacity_factor=null"])


def test_a_dtype_setting_compares_as_the_dtype_it_resolves_to(tmp_path, monkeypatch):
    """A run saved with trainer.dtype=float32 (the default before 'auto') continues under a command whose configs
    say 'auto' on a CPU, where 'auto' is float32, keeping its saved value; on a GPU 'auto' is bfloat16: refused."""
    saved = small_run(tmp_path)
    saved.trainer.dtype = saved.model.dtype = "float32"
    saved.trainer.device = "cpu"
    current = small_run(tmp_path)
    current.trainer.dtype = current.model.dtype = "auto"
    current.trainer.device = "cpu"
    merged, changes = continue_config(saved, current)
    assert changes == {} and merged.trainer.dtype == "float32" and merged.model.dtype == "float32"
    current.trainer.device = "cuda"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # the comparison as on a GPU machine
    with pytest.raises(RunDirectoryError, match='trainer.dtype "float32" -> "auto"'):
        continue_config(saved, current)


def test_a_renamed_option_keeps_its_old_name_for_a_release(tmp_path, capsys, monkeypatch):
    """`sae.decoder` / `sae.encoder_backward` became `sae.decoder_kernel` / `sae.encoder_backward_kernel`: the old
    names set the new ones with one note each, the run folder holds the new names only, and a continued run compares
    a value given under the old name with the saved one."""
    monkeypatch.setattr(validation, "_RENAMES_NOTED", set())
    run_dir = tmp_path / "run"
    out = f"trainer.out_dir={run_dir}"
    train_cli(*FIRST, "sae.encoder_backward=gemm", "sae.decoder=gemm", out)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [
        ("note: sae.encoder_backward is renamed sae.encoder_backward_kernel; sae.encoder_backward=gemm is read as "
         "sae.encoder_backward_kernel=gemm until the next release"),
        ("note: sae.decoder is renamed sae.decoder_kernel; sae.decoder=gemm is read as sae.decoder_kernel=gemm until "
         "the next release"),
    ]
    saved_sae = yaml.safe_load((run_dir / "config.yaml").read_text())["sae"]
    assert (saved_sae["encoder_backward_kernel"], saved_sae["decoder_kernel"]) == ("gemm", "gemm")
    assert "decoder" not in saved_sae and "encoder_backward" not in saved_sae
    checkpoint_sae = json.loads((latest_checkpoint(run_dir) / "config.json").read_text())["run"]["sae"]
    assert checkpoint_sae["decoder_kernel"] == "gemm" and "decoder" not in checkpoint_sae

    with pytest.raises(RunDirectoryError, match='sae.decoder_kernel "gemm" -> "gather"'):
        train_cli(*FIRST, "trainer.steps=6", "sae.encoder_backward=gemm", "sae.decoder=gather", out)
    train_cli(*FIRST, "trainer.steps=6", "sae.encoder_backward=gemm", "sae.decoder=gemm", out)
    assert read_checkpoint_config(latest_checkpoint(run_dir))[2] == 6
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]  # once a process
    assert explicit_settings(["sae.decoder=gemm", "sae.k=4"]) == {"sae.decoder_kernel", "sae.k"}
