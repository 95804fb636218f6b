"""Learning curves: held-out reconstruction at every checkpoint of a run, against tokens and training FLOPs.

A run that keeps its checkpoints (trainer.keep_checkpoints >= the number saved) is a curve: `checkpoint_curve`
evaluates each checkpoint's SAE on a held-out activation cache (MSE in the paper's unit, FVU, L0) beside the dead
latents its training logged at that step, and stores the points in the run folder (`curve.json`) so that a later
call evaluates only new checkpoints. `interpolate` reads a curve between its points (linear in log-x), `crossing`
finds where one curve drops below another on a shared axis (tokens or FLOPs); `plot_curves` draws MSE against tokens
and against training FLOPs, one panel per k.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from matplotlib.ticker import EngFormatter, FormatStrFormatter, LogLocator, NullFormatter

from sae_dist.api import load_sae
from sae_dist.data.cache import CacheUnitReader
from sae_dist.eval.plots import new_figure, save_figure
from sae_dist.metrics import ReconstructionSums
from sae_dist.run_dir import checkpoint_step, read_checkpoint_config, read_metrics

CURVE_FILE = "curve.json"


@dataclass
class CurvePoint:
    step: int
    tokens: int
    """Training tokens seen (token-steps: passes over a cache count again)."""
    mse: float
    """Held-out MSE: mean over tokens of the sum over dims of (x - x_hat)^2."""
    fvu: float
    l0: float
    dead: int | None
    """Dead latents logged at this step (None when the step was not logged)."""


@torch.no_grad()
def heldout_metrics(checkpoint: Path, heldout_dir: Path, rows: int | None = None, batch: int = 8192) -> dict[str, float]:
    """MSE, FVU and L0 of a checkpoint's SAE over the first `rows` (None = all) rows of a held-out cache; for a
    transcoder the rows are [x | y] and the MSE and FVU are y's."""
    sae = load_sae(checkpoint)
    reader = CacheUnitReader(heldout_dir)
    total = reader.total_rows if rows is None else min(rows, reader.total_rows)
    sums = None
    for start in range(0, total, batch):
        x_TD, y_TO = sae.split_batch(reader.read_rows(start, min(start + batch, total)))
        latents = sae.encode(x_TD)
        part = ReconstructionSums.of_batch(y_TO, sae.decode(latents, x_TD), (latents.values_TK > 0).sum())
        sums = part if sums is None else sums + part
    return sums.metrics()


def checkpoint_curve(run_dir: Path, heldout_dir: Path, rows: int | None = None) -> list[CurvePoint]:
    """One point per checkpoint of `run_dir` (ascending steps) over `rows` held-out rows (None = all), reusing
    the points stored in its curve.json (delete it after changing `rows`)."""
    stored_file = run_dir / CURVE_FILE
    stored = {p["step"]: CurvePoint(**p) for p in json.loads(stored_file.read_text())} if stored_file.exists() else {}
    dead_at = {row["step"]: row.get("dead") for row in read_metrics(run_dir)}
    folders = sorted((run_dir / "checkpoints").glob("step_*"), key=checkpoint_step)
    points = []
    for folder in folders:
        step = checkpoint_step(folder)
        if step not in stored:
            run, _, _ = read_checkpoint_config(folder)
            metrics = heldout_metrics(folder, heldout_dir, rows)
            stored[step] = CurvePoint(step, step * run.trainer.batch_size, metrics["mse"], metrics["fvu"],
                                      metrics["l0"], dead_at.get(step))
        points.append(stored[step])
    tmp = stored_file.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(p) for p in sorted(stored.values(), key=lambda p: p.step)], indent=1))
    tmp.replace(stored_file)
    return points


def interpolate(x: float, x_ref: Sequence[float], y_ref: Sequence[float]) -> float | None:
    """The curve (x_ref ascending, y_ref) at x, linear in log x between its points; None outside its range."""
    logs_ref = [math.log(v) for v in x_ref]
    lx = math.log(x)
    if not logs_ref[0] <= lx <= logs_ref[-1]:
        return None
    i = max(j for j in range(len(logs_ref)) if logs_ref[j] <= lx)
    if i == len(logs_ref) - 1:
        return y_ref[i]
    t = (lx - logs_ref[i]) / (logs_ref[i + 1] - logs_ref[i])
    return y_ref[i] + t * (y_ref[i + 1] - y_ref[i])


def crossing(x: Sequence[float], y: Sequence[float], x_ref: Sequence[float], y_ref: Sequence[float]) -> float | None:
    """The first x (ascending) where curve (x, y) is at or below the reference curve, the reference interpolated
    linearly in log x at each of the curve's points inside the reference's x range; None if it never is."""
    for xi, yi in zip(x, y, strict=True):
        y_at = interpolate(xi, x_ref, y_ref)
        if y_at is not None and yi <= y_at:
            return xi
    return None


def log_log_axes(ax, xlabel: str, ylabel: str) -> None:
    """Log axes for curves that span a decade or two: ticks at 1, 2 and 5 of each decade on x (engineering
    notation) and at 1 to 8 (and 1.5, 2.5) on y, nothing in between."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def plot_curves(curves: dict[int, dict[str, tuple[list[float], list[float], list[float]]]], out: Path,
                title: str, label_order: Sequence[str] = ()) -> Path:
    """MSE vs tokens (top row) and vs training FLOPs (bottom row), one column per k.

    `curves[k][label] = (tokens, flops, mse)`; the dense TopK curves' labels start with 'dense' (black; 'dense' solid,
    another dashed). A label has one colour in every panel: the colour of its place in `label_order` (so that figures
    plotting different subsets of the labels agree), then of its place among the labels `label_order` lacks."""
    ks = sorted(curves)
    plotted = {label for by_label in curves.values() for label in by_label if not label.startswith("dense")}
    others = [label for label in label_order if not label.startswith("dense")] + sorted(plotted - set(label_order))
    colours = {label: f"C{i % 10}" for i, label in enumerate(others)}
    fig, axes = new_figure(2, len(ks), figsize=(6.0 * len(ks), 8.0))
    for column, k in enumerate(ks):
        for label, (tokens, flops, mse) in sorted(curves[k].items()):
            style = ({"color": "black", "linewidth": 2.2, "linestyle": "-" if label == "dense" else "--"}
                     if label.startswith("dense") else {"color": colours[label]})
            axes[0, column].plot(tokens, mse, marker="o", markersize=3, label=label, **style)
            axes[1, column].plot(flops, mse, marker="o", markersize=3, label=label, **style)
        for row, xlabel in enumerate(("training tokens (token-steps)", "training FLOPs (encoder, paper's count)")):
            ax = axes[row, column]
            log_log_axes(ax, xlabel, "held-out MSE")
            ax.set_title(f"k = {k}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 70 * len(ks)), fontsize=9)
    return save_figure(fig, out)
