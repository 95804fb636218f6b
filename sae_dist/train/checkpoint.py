"""Checkpoints: model weights as safetensors + a config.json that rebuilds the model, and the trainer state.

Layout of a run directory:
    checkpoints/step_00001000/model.safetensors   weights (experts stacked [N, M_e, d], global expert order)
    checkpoints/step_00001000/config.json         {"d_model": ..., "run": RunConfig as a dict, "step": ...}
    checkpoints/step_00001000/trainer_state.pt    optimizer, scheduler, step, data position, dead counters, RNG
    checkpoints/latest                            name of the newest complete checkpoint
A checkpoint is written to a temporary folder and renamed into place, and `latest` is replaced atomically, so a
crash at any moment leaves the previous checkpoint intact and `latest` pointing at a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sae_dist.config import RunConfig, as_dict, from_dict

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "trainer_state.pt"
LATEST_FILE = "latest"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_model_files(folder: Path, model: nn.Module, run: RunConfig, d_model: int, step: int) -> None:
    """model.safetensors + config.json in `folder` (which must exist)."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    save_file(tensors, str(folder / MODEL_FILE))
    meta = {"format_version": 1, "d_model": d_model, "step": step, "run": as_dict(run)}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def save_checkpoint(
    run_dir: Path, model: nn.Module, run: RunConfig, d_model: int, step: int, trainer_state: dict[str, Any]
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, and keep only the newest `keep_checkpoints`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_model_files(tmp, model, run, d_model, step)
    torch.save(trainer_state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomically(root / LATEST_FILE, final.name.encode())
    for old in sorted(root.glob("step_*[0-9]"))[: -run.trainer.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = Path(run_dir) / "checkpoints" / LATEST_FILE
    if not pointer.exists():
        return None
    return pointer.parent / pointer.read_text().strip()


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder or a run directory (its latest checkpoint); one-line error otherwise."""
    path = Path(path)
    if (path / MODEL_FILE).exists():
        return path
    latest = latest_checkpoint(path)
    if latest is not None and (latest / MODEL_FILE).exists():
        return latest
    raise FileNotFoundError(f"no SAE checkpoint at {str(path)!r}: expected {MODEL_FILE} or checkpoints/{LATEST_FILE}")


def read_checkpoint_config(folder: Path) -> tuple[RunConfig, int, int]:
    """(run config, d_model, step) of a checkpoint folder."""
    meta = json.loads((Path(folder) / CONFIG_FILE).read_text())
    return from_dict(meta["run"]), int(meta["d_model"]), int(meta["step"])


def load_model_weights(folder: Path, model: nn.Module) -> None:
    model.load_state_dict(load_file(str(Path(folder) / MODEL_FILE)))


def load_trainer_state(folder: Path) -> dict[str, Any]:
    return torch.load(Path(folder) / STATE_FILE, weights_only=False)
