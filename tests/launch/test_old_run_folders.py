"""Run folders written before each option declared its facts beside it (`sae_dist.config.option`) still continue:
old_run/ holds the config.yaml and a checkpoint's config.json that launch/train.py wrote then (a Switch SAE on
32-d synthetic activations, 4 steps)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from sae_dist.run_dir import RUN_CONFIG_FILE, latest_checkpoint, read_checkpoint_config, read_run_config
from sae_dist.train.identity import RunDirectoryError, continue_config
from sae_dist.validation import from_dict

OLD_RUN = Path(__file__).resolve().parent / "old_run"


def test_an_old_checkpoint_config_reads_as_the_run_it_defined():
    meta = json.loads((OLD_RUN / "checkpoint_config.json").read_text())
    run = from_dict(meta["run"])
    assert (run.sae.kind, run.sae.num_latents, run.sae.k, run.data.d_model) == ("switch", 256, 4, 32)
    assert run.data.prefetch == 4 and run.trainer.engine == "torch" and run.sae.encoder_backward_kernel == "auto"


def test_an_old_config_accepts_the_changes_it_accepted_then_and_refuses_the_rest():
    saved = read_run_config(OLD_RUN)
    wanted = copy.deepcopy(saved)
    wanted.trainer.steps, wanted.data.prefetch, wanted.sae.k = 8, 0, 8
    merged, changes = continue_config(saved, wanted, ["trainer.steps=8", "data.prefetch=0"])
    assert changes == {"trainer.steps": [4, 8], "data.prefetch": [4, 0]}
    assert (merged.trainer.steps, merged.data.prefetch, merged.sae) == (8, 0, saved.sae)
    with pytest.raises(RunDirectoryError, match="sae.k 4 -> 8"):
        continue_config(saved, wanted, ["sae.k=8"])


def test_launcher_continues_an_old_run_folder(command, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(OLD_RUN / RUN_CONFIG_FILE, folder / RUN_CONFIG_FILE)
    written = (folder / RUN_CONFIG_FILE).read_text()

    refused = command("train.py", f"trainer.out_dir={folder}", "sae.k=8")
    refused.one_line_error("holds a run defined otherwise", "sae.k 4 -> 8")

    done = command("train.py", f"trainer.out_dir={folder}", "trainer.steps=2", "data.prefetch=0")
    assert done.status == 0, done.err[-2000:]
    checkpoint = latest_checkpoint(folder)
    assert checkpoint.name == "step_00000002"
    assert (folder / RUN_CONFIG_FILE).read_text() == written
    trained = read_checkpoint_config(checkpoint)[0]
    assert trained.sae == read_run_config(OLD_RUN).sae
    assert (trained.trainer.steps, trained.data.prefetch, trained.data.d_model) == (2, 0, 32)
