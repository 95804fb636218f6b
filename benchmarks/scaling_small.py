"""The paper's Figure 1 in small: held-out MSE against total latents at fixed k, dense TopK vs the Switch SAE, at
equal tokens and at equal training FLOPs, from runs that `reproduce_paper_small.py` trained at several widths.

    python benchmarks/scaling_small.py --runs runs/repro runs/scaling-1024 runs/scaling-2048 \
        --heldout-cache DIR [--k 32] [--recipes paper expert_lr] [--out runs/scaling]

Each folder of --runs is the --out of one `reproduce_paper_small.py --width M` (dense_k{k}, and width_matched_ and
flop_matched_{recipe}_k{k} of each of --recipes, where trained). Every run is scored at each of its checkpoints on
the held-out cache (stored in the run's curve.json, so nothing is evaluated twice). Printed: one table, a row per
total latent count L and Switch recipe, with at equal tokens (the runs' ends) dense TopK and the Switch SAE of L
latents; at equal FLOPs the dense SAE of width L after 1/N of the tokens (the point of its learning curve that cost
the Switch run's encoder FLOPs, the paper's count; its lr not yet decayed) and the dense SAE of L/N latents after all
tokens (the FLOP-matched pair). Written: OUT/scaling.png (MSE vs total latents; MSE vs training FLOPs) and
OUT/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sae_dist.data.cache import CacheUnitReader
from sae_dist.eval.learning_curves import CurvePoint, checkpoint_curve, interpolate, log_log_axes
from sae_dist.eval.plots import new_figure, save_figure
from sae_dist.flops import flops_per_token
from sae_dist.run_dir import read_run_config


def scored_runs(folders: list[Path], k: int, recipes: list[str], heldout: Path, rows: int) -> list[dict]:
    """Every trained run of the folders: recipe (None: dense TopK), latents, experts, encoder FLOPs per token and
    its curve."""
    d_model = CacheUnitReader(heldout).d_model
    runs = []
    for folder in folders:
        named = [(None, f"dense_k{k}")] + [(recipe, f"{family}_{recipe}_k{k}") for recipe in recipes
                                           for family in ("width_matched", "flop_matched")]
        for recipe, name in named:
            run = read_run_config(folder / name)
            if run is None:
                continue
            points = checkpoint_curve(folder / name, heldout, rows)
            if not points or points[-1].step != run.trainer.steps:
                continue  # still training
            runs.append({"run": str(folder / name), "recipe": recipe, "latents": run.sae.num_latents,
                         "experts": run.sae.num_experts,
                         "flops_per_token": flops_per_token(run.sae, d_model).encoder_paper, "points": points})
    return runs


def dense_at_flops(dense: dict, flops: float) -> float | None:
    """The dense run's held-out MSE at `flops` training FLOPs (its curve, interpolated in log-FLOPs), or None
    outside its curve."""
    points = dense["points"]
    return interpolate(flops, [p.tokens * dense["flops_per_token"] for p in points], [p.mse for p in points])


def percent_change(mse: float, reference: float) -> str:
    return f"{100 * (mse / reference - 1):+.0f}%"


def percent(mse: float, reference: float | None) -> str:
    return "" if reference is None else f"{mse:.2f} ({percent_change(mse, reference)})"


def report(runs: list[dict], k: int, header: str, console: Console) -> list[dict]:
    """The table; returns its rows."""
    dense = {r["latents"]: r for r in runs if r["recipe"] is None}
    switch = [r for r in runs if r["recipe"] is not None]
    table = Table(title=f"held-out MSE vs total latents, k = {k} ({header})")
    for column in ("total latents L", "dense TopK, L", "Switch recipe", "Switch, L", "dense L at the Switch's FLOPs",
                   "dense L / N (FLOP-matched)", "Switch dead"):
        table.add_column(column, justify="right")
    rows = []
    for latents in sorted({r["latents"] for r in runs}):
        d_run = dense.get(latents)
        for s_run in [r for r in switch if r["latents"] == latents] or [None]:
            d_mse = d_run["points"][-1].mse if d_run else None
            cells = [f"{latents:,}", "" if d_mse is None else f"{d_mse:.2f}"]
            row = {"latents": latents, "dense": d_mse}
            if s_run is None:
                table.add_row(*cells, "", "", "", "", "")
                rows.append(row)
                continue
            end: CurvePoint = s_run["points"][-1]
            flops = end.tokens * s_run["flops_per_token"]
            same_flops = dense_at_flops(d_run, flops) if d_run else None
            matched = dense.get(latents // s_run["experts"])
            matched_mse = matched["points"][-1].mse if matched else None
            cells += [s_run["recipe"], percent(end.mse, d_mse) if d_mse else f"{end.mse:.2f}",
                      "" if same_flops is None else f"{same_flops:.2f}",
                      "" if matched_mse is None
                      else f"{matched_mse:.2f} (Switch {percent_change(end.mse, matched_mse)})",
                      f"{end.dead:,} of {latents:,}" if end.dead is not None else ""]
            table.add_row(*cells)
            rows.append(row | {"recipe": s_run["recipe"], "switch": end.mse, "experts": s_run["experts"],
                               "switch_flops": flops,
                               "dense_at_switch_flops": same_flops, "dense_flop_matched": matched_mse,
                               "switch_dead": end.dead})
    console.print(table)
    return rows


def plot(runs: list[dict], out: Path, title: str) -> Path:
    """MSE vs total latents (left) and vs training FLOPs (right), one line for dense TopK and one per Switch
    recipe, at the runs' ends."""
    fig, axes = new_figure(1, 2, figsize=(12.0, 4.8))
    recipes = list(dict.fromkeys(r["recipe"] for r in runs if r["recipe"] is not None))
    lines = [(None, {"color": "black", "linewidth": 2.2, "label": "dense TopK"})]
    lines += [(recipe, {"color": f"C{i + 1}"}) for i, recipe in enumerate(recipes)]
    labelled: set[tuple[bool, float]] = set()
    for recipe, style in lines:
        mine = sorted((r for r in runs if r["recipe"] == recipe), key=lambda r: r["latents"])
        if recipe is not None:
            style["label"] = f"Switch, N = {mine[0]['experts']}, recipe {recipe}"
        mse = [r["points"][-1].mse for r in mine]
        axes[0, 0].plot([r["latents"] for r in mine], mse, marker="o", **style)
        flops = [r["points"][-1].tokens * r["flops_per_token"] for r in mine]
        axes[0, 1].plot(sorted(flops), [m for _, m in sorted(zip(flops, mse, strict=True))], marker="o", **style)
        for run, x, y in zip(mine, flops, mse, strict=True):
            if (recipe is None, x) in labelled:  # another recipe's point of the same L sits here
                continue
            labelled.add((recipe is None, x))
            axes[0, 1].annotate(f"L = {run['latents']:,}", (x, y), textcoords="offset points", xytext=(6, 4),
                                fontsize=7, color=style["color"])
    for ax, xlabel in zip(axes[0], ("total latents", "training FLOPs (encoder, paper's count)"), strict=True):
        log_log_axes(ax, xlabel, "held-out MSE after all tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    latents = sorted({r["latents"] for r in runs})
    axes[0, 0].set_xticks(latents, [f"{m:,}" for m in latents])
    axes[0, 0].set_title("equal tokens")
    axes[0, 1].set_title("equal FLOPs: compare at one x")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True,
                        help="--out folders of reproduce_paper_small.py, one per width")
    parser.add_argument("--heldout-cache", type=Path, required=True)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--recipes", nargs="+", default=["paper"],
                        help="the Switch runs' recipes (their names' middle part), a line each")
    parser.add_argument("--heldout-rows", type=int, default=65_536, help="as reproduce_paper_small.py scored them")
    parser.add_argument("--out", type=Path, default=Path("runs/scaling"))
    args = parser.parse_args()
    if not (args.heldout_cache / "manifest.json").is_file():
        parser.error(f"--heldout-cache {args.heldout_cache} holds no activation cache (manifest.json)")
    missing = [str(f) for f in args.runs if not f.is_dir()]
    if missing:
        parser.error(f"--runs {missing[0]} is not a folder; give the --out folders of reproduce_paper_small.py")
    console = Console(width=200)
    runs = scored_runs(args.runs, args.k, args.recipes, args.heldout_cache, args.heldout_rows)
    if not runs:
        parser.error(f"--runs hold no finished run named dense_k{args.k} or *_{args.recipes[0]}_k{args.k}")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tokens = sorted({r["points"][-1].tokens for r in runs})
    header = f"{stamp}, {', '.join(f'{t / 1e6:.3g}M' for t in tokens)} token-steps per run"
    rows = report(runs, args.k, header, console)
    png = plot(runs, args.out / "scaling.png", f"MiniLM-L6 block 3 over Python sources, k = {args.k}: {header}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps({"date": stamp, "load": os.getloadavg(), "rows": rows,
                                                       "runs": [r["run"] for r in runs]}, indent=1))
    console.print(f"plot: {png}\nresults: {args.out / 'scaling.json'}")


if __name__ == "__main__":
    main()
