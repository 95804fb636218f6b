"""What the commands that read a checkpoint's latents over text check before loading anything
(launch/inspect_features.py, launch/autointerp.py).

Apart from `cli` because it reads the inspection code (`eval.inspect`), whose plotting library the other commands,
training among them, do not load."""

from __future__ import annotations

import os
from pathlib import Path

from sae_dist.cli import check_checkpoint, fail
from sae_dist.config import RunConfig
from sae_dist.eval.inspect import text_run_config
from sae_dist.train.preflight import check_inputs


def check_inspection(checkpoint: str | os.PathLike, latents: list[int] | None) -> tuple[Path, RunConfig]:
    """The checkpoint, the --latents ids in it, and the model and text its activations came from. Returns
    (checkpoint folder, its run config)."""
    folder, run = check_checkpoint(checkpoint)
    num_latents = run.sae.num_latents
    for latent in latents or []:
        if not 0 <= latent < num_latents:
            fail(f"--latents {latent} is not a latent of this SAE (allowed: 0 to {num_latents - 1})")
    check_inputs(text_run_config(run))
    return folder, run
