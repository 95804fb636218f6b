"""The paper's figures as PNGs from run folders: MSE-vs-L0 frontier, MSE vs training FLOPs, expert load over
training, and the expert-by-expert similarity heat map.

Which runs a line joins, how lines are labelled and what the titles say: `sae_dist.eval.runs`. Every figure has a
title naming the runs' shared settings, labelled axes and a legend or a labelled colour bar.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from itertools import cycle
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or in tests
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from sae_dist.config import RunConfig  # noqa: E402
from sae_dist.eval.runs import RunPoint, load_run_point, series, shared_title, show  # noqa: E402
from sae_dist.flops import training_flops  # noqa: E402
from sae_dist.run_dir import GEOMETRY_FILE, find_report, read_metrics, read_run_config  # noqa: E402

_DPI = 110
LEGEND_MAX_EXPERTS = 16
"""Expert-load plots name up to this many experts in a legend; more get a colour bar of expert ids."""
PARETO_SWEEPS = ("sae.k", "sae.l1_coefficient", "sae.l1_warmup_frac")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")
"""Open markers of distinct shapes, so that runs at the same point stay visible."""
SCALING_SWEEPS = ("sae.num_latents", "trainer.steps", "trainer.batch_size", "trainer.lr")


def new_figure(rows: int = 1, columns: int = 1, figsize: tuple[float, float] = (6.4, 4.4)):
    """(figure, axes as a [rows, columns] array) on the file-only backend, laid out so that titles, a figure title
    and colour bars never overlap."""
    return plt.subplots(rows, columns, figsize=figsize, squeeze=False, layout="constrained")


def save_figure(fig: plt.Figure, out: str | Path) -> Path:
    """Write `fig` as a PNG (creating the folder) and free it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    # Legends placed outside the axes (left out of the layout) stay in the picture, beside the default artists.
    fig.savefig(out, dpi=_DPI, bbox_inches="tight", bbox_extra_artists=fig.get_default_bbox_extra_artists() + legends)
    plt.close(fig)
    return out


def _legend(ax, count: int) -> None:
    """A legend below the axes when the lines are many, inside them otherwise. The one below is left out of the
    layout (so that it never squeezes the axes) and kept in the picture by save_figure's tight bounding box."""
    if count > 4:
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.16)).set_in_layout(False)
    else:
        ax.legend(fontsize="small")


def _plain_log_ticks(axis, values: Sequence[float]) -> None:
    """Tick labels of a log axis as plain numbers (2.5, not 2.5x10^0), with labelled ticks between the powers of 10
    when the values span less than 3 decades."""
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axis.set_major_formatter(plain)
    decades = math.log10(max(values) / min(values)) if min(values) > 0 else math.inf
    if decades < 3:  # a few decades at most: label 2 and 5 (and more within one decade) between the powers of 10
        subs = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0) if decades < 1 else (2.0, 5.0)
        axis.set_minor_locator(LogLocator(subs=subs))
        axis.set_minor_formatter(plain)
    else:
        axis.set_minor_formatter(NullFormatter())


def plot_pareto(points: Sequence[RunPoint], out: str | Path, title: str = "") -> Path:
    """MSE vs L0, one line per set of runs that differ only in k (or the L1 coefficient); lower-left is better."""
    lines = series(points, PARETO_SWEEPS, order=lambda p: p.l0)
    fig, axes = new_figure()
    ax = axes[0, 0]
    for line, marker in zip(lines, cycle(MARKERS)):
        ax.plot([p.l0 for p in line.points], [p.mse for p in line.points], marker=marker, mfc="none",
                label=line.label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("MSE (sum over dims, mean over tokens)")
    ax.set_title(title or shared_title(points, "MSE vs L0 (lower left is better)"), fontsize="medium")
    ax.grid(alpha=0.3)
    _legend(ax, len(lines))
    return save_figure(fig, out)


def plot_scaling(points: Sequence[RunPoint], out: str | Path, title: str = "") -> Path:
    """MSE vs training FLOPs (the paper's encoder-only count), log-log, one line per set of runs that differ only
    in width, length, batch or learning rate."""

    def flops(p: RunPoint) -> float:
        return training_flops(p.run.sae, p.d_model, p.tokens)["encoder_paper"]

    lines = series(points, SCALING_SWEEPS, order=flops, by_family=False)
    fig, axes = new_figure()
    ax = axes[0, 0]
    for line, marker in zip(lines, cycle(MARKERS)):
        ax.plot([flops(p) for p in line.points], [p.mse for p in line.points], marker=marker, mfc="none",
                label=line.label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis, [p.mse for p in points])
    ax.set_xlabel("training FLOPs (encoder only, forward + backward)")
    ax.set_ylabel("MSE (sum over dims, mean over tokens)")
    ax.set_title(title or shared_title(points, "MSE vs training compute"), fontsize="medium")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(lines))
    return save_figure(fig, out)


def run_label(name: str, run: RunConfig) -> str:
    """'<name>: N=8, M=6144, k=32, steps=400': a Switch run's panel or heat-map title."""
    sae = run.sae
    described = [("sae.num_experts", sae.num_experts), ("sae.num_latents", sae.num_latents), ("sae.k", sae.k),
                 ("trainer.steps", run.trainer.steps)]
    return f"{name}: " + ", ".join(show(key, value) for key, value in described)


def plot_expert_load(run_dirs: Sequence[str | Path], out: str | Path) -> Path | None:
    """Share of tokens routed to each expert vs step, one panel per run with 'expert_load' rows (None if none).
    Experts are named in a legend (up to LEGEND_MAX_EXPERTS) or by a colour bar of expert ids."""
    loads = {}
    for run_dir in map(Path, run_dirs):
        rows = [row for row in read_metrics(run_dir) if "expert_load" in row]
        if rows:
            loads[run_dir] = rows
    if not loads:
        return None
    fig, axes = new_figure(len(loads), 1, figsize=(7.4, 2.8 * len(loads) + 0.4))
    for ax, (run_dir, rows) in zip(axes[:, 0], loads.items(), strict=True):
        steps = [row["step"] for row in rows]
        shares_NS = list(zip(*(row["expert_load"] for row in rows), strict=True))
        n = len(shares_NS)
        cmap = plt.get_cmap("tab20" if n <= 20 else "viridis", n)
        colors = [cmap(e) for e in range(n)]
        if len(steps) > 1:
            ax.stackplot(steps, shares_NS, colors=colors, labels=[f"expert {e}" for e in range(n)],
                         linewidth=0.3, edgecolor="white")
            ax.set_xlim(steps[0], steps[-1])
        else:  # one logged row: its shares as one stacked bar (a stack plot of one step has no area)
            bottom = 0.0
            for e, (share,) in enumerate(shares_NS):
                ax.bar(steps, [share], bottom=bottom, color=colors[e], label=f"expert {e}", edgecolor="white")
                bottom += share
            ax.set_xticks(steps)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
        ax.set_ylabel("share of tokens")
        ax.set_title(run_label(run_dir.name, read_run_config(run_dir)), fontsize="small")
        if n <= LEGEND_MAX_EXPERTS:
            ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 + n // 9)
        else:
            mappable = plt.cm.ScalarMappable(BoundaryNorm(range(n + 1), n), ListedColormap(colors))
            fig.colorbar(mappable, ax=ax, label="expert id")
    fig.suptitle("expert load over training (even bands: uniform routing, 1/N each)", fontsize="medium")
    return save_figure(fig, out)


def plot_similarity(matrix_NN: Sequence[Sequence[float]], out: str | Path, title: str = "") -> Path:
    """Heat map of an expert-by-expert similarity matrix [N, N] (geometry.json 'expert_similarity': entry (a, b) is
    the mean, over expert a's decoder rows, of the cosine of their nearest neighbour among expert b's rows)."""
    n = len(matrix_NN)
    fig, axes = new_figure(figsize=(5.6, 4.6))
    ax = axes[0, 0]
    image = ax.imshow(matrix_NN, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="mean nearest-neighbour cosine")
    ax.set_xlabel("expert b (where the nearest neighbour is sought)")
    ax.set_ylabel("expert a (its decoder rows)")
    if n <= 16:
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
    ax.set_title(title or "expert similarity", fontsize="medium")
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
        geometry = find_report(run_dir, GEOMETRY_FILE)
        if geometry is not None:
            matrix = json.loads(geometry.read_text()).get("expert_similarity")
            if matrix:
                written.append(plot_similarity(matrix, out_dir / f"similarity_{run_dir.name}.png",
                                               "expert similarity\n" + run_label(run_dir.name,
                                                                                  read_run_config(run_dir))))
    return written
