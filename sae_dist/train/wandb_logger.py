"""Weights & Biases beside TensorBoard (trainer.wandb): the metrics rows of metrics.jsonl, as the same scalars, with
the run's config.

One W&B run per sae-dist run: its id is kept in the run folder (`WANDB_ID_FILE`), so a continued run (a resume, a
requeue) logs into the same W&B run, with its config updated to the continued run's. Every scalar is plotted over
`train/step`; the rows a crash lost after the last checkpoint are logged again by the continued run at the same
steps. W&B's files go to the run folder (RUN/wandb/) unless WANDB_DIR names another; `trainer.wandb_mode` (null:
WANDB_MODE, else W&B's default) chooses online, offline or disabled; WANDB_ENTITY and the other WANDB_* variables
apply as usual. wandb is an optional extra (`pip install 'sae-dist[wandb]'`), imported only when a run logs to it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from sae_dist.config import RunConfig, as_dict
from sae_dist.run_dir import WANDB_ID_FILE, write_atomically

STEP_KEY = "train/step"
"""The x axis of every scalar."""


class WandbLogger:
    """Rank 0's W&B run for the run folder `run_dir` of `run`."""

    def __init__(self, run: RunConfig, run_dir: Path):
        import wandb  # an optional extra, imported only when logging to W&B

        cfg = run.trainer
        id_file = Path(run_dir) / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
        self.run = wandb.init(
            project=cfg.wandb_project, name=cfg.wandb_name or run.name, id=run_id, resume="allow",
            mode=cfg.wandb_mode, dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
            config=as_dict(run), allow_val_change=True, reinit="create_new",  # a sweep's members log side by side
        )
        write_atomically(id_file, run_id.encode())
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("train/*", step_metric=STEP_KEY)

    def log(self, scalars: dict[str, float], step: int) -> None:
        """One metrics row's scalars (`logging.row_scalars`) at `step`."""
        self.run.log({STEP_KEY: step, **scalars})

    def close(self) -> None:
        self.run.finish()

