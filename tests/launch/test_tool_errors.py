"""evaluate.py, analyze.py, plot.py, inspect_features.py, autointerp.py and load_sae on damaged checkpoints and bad
options: one line, exit status 2 (formerly: tracebacks, or a silent load of corrupted weights)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sae_dist import load_sae
from sae_dist.checksums import CHECKSUM_FILE, write_checksums
from sae_dist.config import as_dict
from sae_dist.data import build_activation_source
from sae_dist.run_dir import CONFIG_FILE, MODEL_FILE, RUN_CONFIG_FILE, CheckpointError, latest_checkpoint
from sae_dist.train.trainer import Trainer
from tests.conftest import small_run

TOOLS = [
    ("evaluate.py", []),
    ("analyze.py", []),
    ("inspect_features.py", ["--out", "{tmp}/features"]),
    ("autointerp.py", ["--out", "{tmp}/autointerp.json", "--base-url", "http://127.0.0.1:9/v1"]),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = small_run(tmp_path_factory.mktemp("tools"), steps=10, checkpoint_every=10)
    Trainer(run, build_activation_source(run)).train()
    (Path(run.trainer.out_dir) / RUN_CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(as_dict(run))))
    return run.trainer.out_dir


def damage(folder, how: str) -> None:
    weights, config = folder / MODEL_FILE, folder / CONFIG_FILE
    data = weights.read_bytes()
    if how == "truncated weights":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "random bytes as weights":
        weights.write_bytes(os.urandom(len(data)))
    elif how == "4 KiB of random bytes inside the weights":
        middle = len(data) // 2
        weights.write_bytes(data[:middle] + os.urandom(4096) + data[middle + 4096:])
    elif how == "config.json that is not JSON":
        config.write_text("{not json")
    elif how == "config.json with an unknown field, checksums rewritten":
        meta = json.loads(config.read_text())
        meta["run"]["sae"]["bogus"] = 1
        config.write_text(json.dumps(meta))
        write_checksums(folder)
    elif how == "truncated weights, no checksums (older checkpoint)":
        (folder / CHECKSUM_FILE).unlink()
        weights.write_bytes(data[: len(data) // 2])
    else:
        raise ValueError(how)


DAMAGE = {
    "truncated weights": "model.safetensors is corrupted",
    "random bytes as weights": "model.safetensors is corrupted",
    "4 KiB of random bytes inside the weights": "model.safetensors is corrupted",
    "config.json that is not JSON": "config.json is corrupted",
    "config.json with an unknown field, checksums rewritten": "Key 'bogus' not in 'SAEConfig'",
    "truncated weights, no checksums (older checkpoint)": "cannot be loaded into the SAE",
}


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_checkpoints_are_refused_by_every_reader(trained, tmp_path, command, how):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    folder = latest_checkpoint(run_dir)
    damage(folder, how)
    with pytest.raises(CheckpointError) as info:
        load_sae(run_dir)
    assert DAMAGE[how] in str(info.value) and "\n" not in str(info.value)
    for script, options in TOOLS:
        if script == "autointerp.py" and "older" in how:
            continue  # without checksums the damage shows when loading, after the endpoint check
        outcome = command(script, str(run_dir), *(o.format(tmp=tmp_path) for o in options))
        if "older" in how:  # the missing SHA256SUMS is said once per process, in a warning before the error; the
            # damage shows when the SAE loads, after the checks, so after the output folder's line too
            outcome.err = "\n".join(line for line in outcome.error_lines if not line.startswith("warning: "))
            assert outcome.out.startswith("output folder: ") and outcome.out.count("\n") == 1, outcome.out
            outcome.out = ""
        outcome.one_line_error(DAMAGE[how])
    if "weights" in how and "older" not in how:
        command("plot.py", str(run_dir), "--out", str(tmp_path / "plots")).one_line_error(DAMAGE[how])


def test_checksums_are_sha256sum_compatible(trained):
    if shutil.which("sha256sum") is None:
        pytest.skip("no sha256sum here")
    folder = latest_checkpoint(trained)
    check = subprocess.run(["sha256sum", "--check", "--quiet", CHECKSUM_FILE], cwd=folder, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    listed = (folder / CHECKSUM_FILE).read_text()
    assert "state/.metadata" in listed and "ranks/rank_00000.pt" in listed and MODEL_FILE in listed


def test_outputs_are_checked_before_loading(trained, tmp_path, command, no_loading):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    for script, option in [("evaluate.py", "--out"), ("analyze.py", "--out"), ("inspect_features.py", "--out"),
                           ("plot.py", "--out")]:
        target = f"{blocker}/eval.json" if script == "evaluate.py" else str(blocker)
        outcome = command(script, str(trained), option, target)
        outcome.one_line_error(f"{option}={blocker}", "cannot be a folder")
    command("autointerp.py", str(trained), "--out", f"{blocker}/x.json").one_line_error("cannot be a folder")


def test_bad_options_are_refused_before_loading(trained, tmp_path, command, no_loading):
    command("evaluate.py", str(trained), "--batches", "0").one_line_error("--batches=0 must be positive")
    command("evaluate.py", str(trained), "--heldout-frac", "1.5").one_line_error("--heldout-frac=1.5 must be in")
    command("analyze.py", str(trained), "--chunk", "-1").one_line_error("--chunk=-1 must be positive")
    command("inspect_features.py", str(trained), "--out", str(tmp_path / "f"), "--latents", "999999").one_line_error(
        "--latents 999999 is not a latent of this SAE (allowed: 0 to 255)"
    )
    outcome = command("autointerp.py", str(trained), "--out", str(tmp_path / "a.json"), "--base-url",
                      "http://127.0.0.1:9/v1")
    outcome.one_line_error("--base-url=http://127.0.0.1:9/v1 does not answer")
    command("evaluate.py", str(tmp_path / "nowhere")).one_line_error("no SAE checkpoint at")
    command("plot.py", str(tmp_path / "nowhere"), "--out", str(tmp_path / "p")).one_line_error("nowhere")


def test_intact_checkpoint_without_checksums_still_loads(trained, tmp_path):
    """Checkpoints written before checksums existed are read (unverified), so old runs stay usable."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    (latest_checkpoint(run_dir) / CHECKSUM_FILE).unlink()
    for name, tensor in load_sae(trained).state_dict().items():
        assert torch.equal(load_sae(run_dir).state_dict()[name], tensor)
