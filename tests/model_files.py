"""A checkpoint's single-file export written straight from a model, for tests that need a checkpoint folder
without training one."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from sae_dist import checksums
from sae_dist.config import RunConfig
from sae_dist.train.checkpoint import write_model_tensors


def write_model_files(folder: Path, model: nn.Module, run: RunConfig, d_model: int, step: int) -> None:
    """model.safetensors + config.json (and their SHA256SUMS) in `folder` for a model holding every expert."""
    write_model_tensors(folder, model.state_dict(), run, d_model, step)
    checksums.write_checksums(folder)
