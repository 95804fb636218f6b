"""trainer.wandb: the metrics rows reach Weights & Biases as the scalars TensorBoard gets, with the run's config, and
a continued run logs into the same W&B run. Offline (WANDB_MODE=offline): the offline run folder is read back."""

from __future__ import annotations

import glob
import json
import struct
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sae_dist.config import ConfigError
from sae_dist.data import build_activation_source
from sae_dist.run_dir import read_metrics
from sae_dist.train import preflight
from sae_dist.train.logging import row_scalars
from sae_dist.train.trainer import Trainer
from sae_dist.validation import validate

BLOCK = 32768
"""The .wandb file: a 7-byte header, then records in blocks of this size, each record chunk with a 7-byte header
(crc32, length, kind: 1 whole, 2 first, 3 middle, 4 last), protobuf `Record`s once joined."""


def wandb_records(path: Path) -> list:
    """The complete records of a .wandb file (one that W&B may still be writing)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, joined, records = path.read_bytes(), 7, b"", []
    assert data[:4] in (b":W&B", b":W&B"[: len(data)])  # the file may still be empty
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # too little left in the block for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += BLOCK - pos % BLOCK
            continue
        if pos + 7 + length > len(data):  # a record still being written
            break
        joined += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(joined)
            records.append(record)
            joined = b""
    return records


def offline_run(wandb_dir: Path, run_id: str, nth: int, wait_s: float = 120) -> tuple[list[dict], dict]:
    """(history rows, config) of the `nth` offline run (in time order) with id `run_id`, once W&B's service, which
    writes the file after `finish` returns, has written its exit record."""
    pattern = str(wandb_dir / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb")
    deadline, records = time.monotonic() + wait_s, []
    while time.monotonic() < deadline:
        files = sorted(glob.glob(pattern))
        records = wandb_records(Path(files[nth])) if len(files) > nth else []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.2)
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "run":
            config.update({item.key: json.loads(item.value_json) for item in r.run.config.update})
    return history, config


@pytest.fixture
def offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'sae-dist[wandb]')")
    for name, folder in [("WANDB_DIR", "wandb_dir"), ("WANDB_CONFIG_DIR", "wandb_config"),
                         ("WANDB_CACHE_DIR", "wandb_cache"), ("WANDB_DATA_DIR", "wandb_data")]:
        (tmp_path / folder).mkdir()
        monkeypatch.setenv(name, str(tmp_path / folder))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path / "wandb_dir"


def test_wandb_gets_every_row_and_the_config_and_a_resume_continues_its_run(make_run, offline):
    run = make_run(steps=10, log_every=5, checkpoint_every=10, wandb=True, wandb_project="sae-dist-test")
    Trainer(run, build_activation_source(run)).train()
    run_id = (Path(run.trainer.out_dir) / "wandb_run_id").read_text()
    history, config = offline_run(offline, run_id, 0)
    rows = read_metrics(run.trainer.out_dir)
    assert [h["train/step"] for h in history] == [r["step"] for r in rows] == [5, 10]
    for logged, row in zip(history, rows, strict=True):
        scalars = {key: value for key, value in logged.items() if key.startswith("train/") and key != "train/step"}
        assert scalars == pytest.approx(row_scalars(row))
        assert {"train/loss", "train/mse", "train/fvu", "train/expert_load/3"} <= scalars.keys()
    assert config["sae"]["num_latents"] == 256 and config["trainer"]["steps"] == 10 and config["name"] == "run"

    longer = replace(run, trainer=replace(run.trainer, steps=20))
    Trainer(longer, build_activation_source(longer)).train()
    assert (Path(run.trainer.out_dir) / "wandb_run_id").read_text() == run_id
    history, config = offline_run(offline, run_id, 1)
    assert [h["train/step"] for h in history] == [15, 20] and config["trainer"]["steps"] == 20


def test_off_by_default_and_a_missing_package_is_one_line(make_run, monkeypatch):
    run = make_run()
    assert not run.trainer.wandb
    preflight.check_loggers(run)
    run.trainer.wandb = True
    monkeypatch.setattr(preflight.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"^trainer.wandb=true needs the wandb package: pip install "):
        preflight.check_loggers(run)


def test_bad_modes_are_one_line(make_run):
    run = make_run()
    run.trainer.wandb_mode = "sometimes"
    with pytest.raises(ConfigError, match=r"^trainer.wandb_mode='sometimes' is unknown; allowed: online, offline, "
                                          r"disabled$"):
        validate(run)
