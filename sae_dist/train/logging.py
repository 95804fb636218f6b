"""Writing run logs: one JSON object per logged step in metrics.jsonl, the same scalars in TensorBoard and (with
trainer.wandb) Weights & Biases (`wandb_logger.py`), and the run's history (each start and resume, with the settings
changed on resume) in resume_history.jsonl. Readers of both files are in `sae_dist.run_dir`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from sae_dist.config import RunConfig
from sae_dist.run_dir import HISTORY_FILE, METRICS_FILE, TENSORBOARD_DIR, read_metrics, write_atomically
from sae_dist.train.wandb_logger import WandbLogger


def append_history(run_dir: str | Path, event: dict[str, Any]) -> None:
    """Add one event (with the time and the command line) to the run's resume history."""
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **event, "argv": sys.argv}
    with (Path(run_dir) / HISTORY_FILE).open("a") as f:
        f.write(json.dumps(row) + "\n")


def row_scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row's scalars as the dashboards show them: 'train/<key>' for each number but the step, and
    'train/<key>/<i>' for each item of a list (the experts' load)."""
    scalars: dict[str, float] = {}
    for key, value in row.items():
        if isinstance(value, (int, float)) and key != "step":
            scalars[f"train/{key}"] = value
        elif isinstance(value, list):
            for i, item in enumerate(value):
                scalars[f"train/{key}/{i}"] = item
    return scalars


class MetricsLogger:
    """Appends to metrics.jsonl; on resume, first drops rows logged after the checkpoint being resumed. `wandb_run`:
    the run to log to W&B as well (None: no W&B)."""

    def __init__(self, run_dir: Path, resume_step: int = 0, tensorboard: bool = True,
                 wandb_run: RunConfig | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [row for row in read_metrics(run_dir) if row["step"] <= resume_step]
        write_atomically(self.path, "".join(json.dumps(row) + "\n" for row in kept).encode())
        self.file = self.path.open("a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=resume_step + 1)
        self.wandb = WandbLogger(wandb_run, Path(run_dir)) if wandb_run is not None else None

    def log(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        scalars = row_scalars(row)
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close()
