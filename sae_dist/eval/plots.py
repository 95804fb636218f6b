"""The paper's figures as PNGs from run directories: MSE-vs-L0 frontier, MSE vs training FLOPs, expert load over
training, and the expert-by-expert similarity heat map.

A run directory contributes one `RunPoint`: its config (config.yaml), d (the checkpoint's config.json), and its
final metrics, from `eval.json` in the latest checkpoint folder when present (held-out evaluation), else from the
last row of metrics.jsonl (training batches). Runs are grouped into families by comparing them with the dense runs
plotted beside them: a Switch SAE whose experts are each as wide as a dense SAE is FLOP-matched to it, one whose
total width equals a dense SAE's is width-matched.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or in tests
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from sae_dist.config import RunConfig, from_dict  # noqa: E402
from sae_dist.eval.flops import training_flops  # noqa: E402
from sae_dist.train.checkpoint import latest_checkpoint, read_checkpoint_config  # noqa: E402
from sae_dist.train.logging import read_metrics  # noqa: E402

EVAL_FILE = "eval.json"
GEOMETRY_FILE = "geometry.json"
_DPI = 110


@dataclass
class RunPoint:
    """One trained SAE as a point of the frontier and scaling plots."""

    name: str
    run: RunConfig
    d_model: int
    tokens: int
    """Training tokens."""
    mse: float
    """Sum over dims, mean over tokens (the paper's unit)."""
    fvu: float
    l0: float


def _find(run_dir: Path, filename: str) -> Path | None:
    """`filename` in the run's latest checkpoint folder, else in the run directory, else None."""
    checkpoint = latest_checkpoint(run_dir)
    for folder in ([checkpoint] if checkpoint is not None else []) + [run_dir]:
        if (folder / filename).is_file():
            return folder / filename
    return None


def _eval_metrics(report: dict[str, Any]) -> dict[str, float]:
    """mse / fvu / l0 of an eval.json written by launch/evaluate.py (its 'reconstruction' section)."""
    section = report["reconstruction"]
    return {key: float(section[key]) for key in ("mse", "fvu", "l0")}


def load_run_point(run_dir: str | Path) -> RunPoint:
    """The RunPoint of a run directory (see module docstring); FileNotFoundError if it has no metrics."""
    run_dir = Path(run_dir)
    run = from_dict(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")))
    checkpoint = latest_checkpoint(run_dir)
    d_model = read_checkpoint_config(checkpoint)[1] if checkpoint is not None else run.data.d_model
    rows = [row for row in read_metrics(run_dir) if "mse" in row]
    if not rows:
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl rows with 'mse'")
    metrics = {key: float(rows[-1].get(key, float("nan"))) for key in ("mse", "fvu", "l0")}
    eval_path = _find(run_dir, EVAL_FILE)
    if eval_path is not None:
        metrics = _eval_metrics(json.loads(eval_path.read_text()))
    return RunPoint(run_dir.name, run, d_model, int(rows[-1]["tokens"]), **metrics)


def run_family(points: Sequence[RunPoint], point: RunPoint) -> str:
    """'TopK', 'ReLU', 'Switch FLOP-matched', 'Switch width-matched' or 'Switch' (no dense run to match)."""
    sae = point.run.sae
    if sae.kind != "switch":
        return {"topk": "TopK", "relu": "ReLU"}[sae.kind]
    dense_widths = {p.run.sae.num_latents for p in points if p.run.sae.kind != "switch"}
    if sae.num_latents // sae.num_experts in dense_widths:
        return "Switch FLOP-matched"
    if sae.num_latents in dense_widths:
        return "Switch width-matched"
    return "Switch"


def _label(points: Sequence[RunPoint], point: RunPoint, with_width: bool) -> str:
    sae = point.run.sae
    parts = [run_family(points, point)]
    if sae.kind == "switch":
        parts.append(f"N={sae.num_experts}")
    if with_width:
        parts.append(f"M={sae.num_latents}")
    return " ".join(parts)


def _series(points: Sequence[RunPoint], key, with_width: bool) -> dict[str, list[RunPoint]]:
    """Points grouped by label, each group sorted by `key`."""
    groups: dict[str, list[RunPoint]] = defaultdict(list)
    for point in points:
        groups[_label(points, point, with_width)].append(point)
    return {label: sorted(group, key=key) for label, group in sorted(groups.items())}


def new_figure(rows: int = 1, columns: int = 1, figsize: tuple[float, float] = (6.4, 4.4)):
    """(figure, axes as a [rows, columns] array) on the file-only backend."""
    return plt.subplots(rows, columns, figsize=figsize, squeeze=False)


def save_figure(fig: plt.Figure, out: str | Path) -> Path:
    """Write `fig` as a PNG (creating the folder) and free it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=_DPI)
    plt.close(fig)
    return out


def plot_pareto(points: Sequence[RunPoint], out: str | Path, title: str = "") -> Path:
    """MSE vs L0, one line per (family, N, M) through its k grid; lower-left is better."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    widths = {p.run.sae.num_latents for p in points if p.run.sae.kind != "switch"}
    for label, group in _series(points, key=lambda p: p.l0, with_width=len(widths) > 1).items():
        ax.plot([p.l0 for p in group], [p.mse for p in group], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("MSE (sum over dims)")
    ax.set_title(title or "MSE vs L0")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, out)


def plot_scaling(points: Sequence[RunPoint], out: str | Path, title: str = "") -> Path:
    """MSE vs training FLOPs (the paper's encoder-only count), log-log, one line per (family, N)."""
    fig, axes = new_figure()
    ax = axes[0, 0]

    def flops(p: RunPoint) -> float:
        return training_flops(p.run.sae, p.d_model, p.tokens)["encoder_paper"]

    for label, group in _series(points, key=flops, with_width=False).items():
        ax.plot([flops(p) for p in group], [p.mse for p in group], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs (encoder only, forward + backward)")
    ax.set_ylabel("MSE (sum over dims)")
    ax.set_title(title or "Scaling: MSE vs training compute")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return save_figure(fig, out)


def plot_expert_load(run_dirs: Sequence[str | Path], out: str | Path) -> Path | None:
    """Share of tokens routed to each expert vs step, one panel per run with 'expert_load' rows (None if none)."""
    loads = {}
    for run_dir in run_dirs:
        rows = [row for row in read_metrics(run_dir) if "expert_load" in row]
        if rows:
            loads[Path(run_dir).name] = rows
    if not loads:
        return None
    fig, axes = new_figure(len(loads), 1, figsize=(6.4, 2.6 * len(loads)))
    for ax, (name, rows) in zip(axes[:, 0], loads.items(), strict=True):
        steps = [row["step"] for row in rows]
        shares_NS = list(zip(*(row["expert_load"] for row in rows), strict=True))
        ax.stackplot(steps, shares_NS, linewidth=0.3, edgecolor="white")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of tokens")
        ax.set_title(f"{name}: expert load ({len(shares_NS)} experts; uniform = even bands)", fontsize="small")
    axes[-1, 0].set_xlabel("step")
    return save_figure(fig, out)


def plot_similarity(matrix_NN: Sequence[Sequence[float]], out: str | Path, title: str = "") -> Path:
    """Heat map of an expert-by-expert similarity matrix [N, N] (e.g. geometry.json 'expert_similarity')."""
    n = len(matrix_NN)
    fig, axes = new_figure(figsize=(5.2, 4.4))
    ax = axes[0, 0]
    image = ax.imshow(matrix_NN, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax)
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    if n <= 16:
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
    ax.set_title(title or "expert similarity")
    return save_figure(fig, out)


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Every plot the runs have data for, into `out_dir`: pareto.png, scaling.png, expert_load.png and
    similarity_<run>.png for each run with a geometry.json."""
    out_dir = Path(out_dir)
    points = [load_run_point(run_dir) for run_dir in run_dirs]
    written = [plot_pareto(points, out_dir / "pareto.png"), plot_scaling(points, out_dir / "scaling.png")]
    load = plot_expert_load(run_dirs, out_dir / "expert_load.png")
    written += [load] if load is not None else []
    for run_dir in map(Path, run_dirs):
        geometry = _find(run_dir, GEOMETRY_FILE)
        if geometry is not None:
            matrix = json.loads(geometry.read_text()).get("expert_similarity")
            if matrix:
                written.append(plot_similarity(matrix, out_dir / f"similarity_{run_dir.name}.png", run_dir.name))
    return written
