"""The paper's main comparison as learning curves, from activation caches: dense TopK vs FLOP-matched vs
width-matched Switch, under the paper's recipe and the recipe options.

    python benchmarks/reproduce_paper_small.py --train-cache DIR --heldout-cache DIR [--out runs/repro]
        [--width 512] [--experts 8] [--ks 16 32] [--tokens 10000000] [--batch-size 4096] [--points 8] [--seed 0]
        [--recipes paper expert_lr] [--dense-auxk-scales x_variance gao] [--only NAME ...] [--report-only]

The caches are written by launch/cache_activations.py (docs/reproduction.md gives the commands: MiniLM-L6 block 3
over the Python source files of the installed packages, held-out from other files); the runs read at the training
cache's site, and a cache of transcoder rows [x | y] (written with model.target_hookpoint) makes every run a
transcoder, scored on its target y. At each k, each SAE trains for --tokens token-steps (passes over the training
cache: the report prints how many) from one seed (--seed: the initialisation and the order of the rows; another seed
wants another --out) and keeps --points checkpoints; each
checkpoint is evaluated on --heldout-rows rows of the held-out cache taken in `HELDOUT_PIECES` evenly spaced stretches
over all of it, so over every shuffle block and the documents of each (the first rows alone are one block: the
documents read first); MSE in the paper's unit, FVU, L0; dead latents as logged at that step. Scores are stored per
held-out set (its manifest's SHA-256 and the rows), so --report-only with another --heldout-cache scores again.
The SAEs:
- dense TopK of width M (AuxK 1/32: the baseline; one run per k, shared by the recipes), under each AuxK scale of
  --dense-auxk-scales (`dense` for the default 'x_variance', `dense_auxk_gao` for 'gao'; crossings are against `dense`);
- FLOP-matched Switch: N experts, each as wide as the dense SAE (N * M latents, the dense SAE's encoder FLOPs);
- width-matched Switch: the same M latents over N experts (N times fewer encoder FLOPs);
each Switch SAE under every recipe of --recipes (RECIPES: the paper's, and the options of sae_dist/config.py).
Printed: one table per k (held-out MSE at each token count, FVU and dead latents at the end, where each Switch
curve crosses below the dense one in tokens and in FLOPs; the header names the passes and the held-out documents);
written: OUT/curves.png (MSE vs tokens and vs training FLOPs) and OUT/results.json (every point, with date, device
and load). A run that holds its last checkpoint is not
trained again, and evaluated checkpoints are not evaluated again; --only trains the named runs and reports nothing (run
several invocations side by side), --report-only trains nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from sae_dist.config import AUXK_SCALES, DataConfig, ModelConfig, RunConfig, SAEConfig, TrainerConfig
from sae_dist.data.cache import (
    MANIFEST,
    CacheUnitReader,
    cache_site_mismatch,
    cache_target_width,
    describe_cache,
    read_manifest,
)
from sae_dist.data.cache_writer import write_cache
from sae_dist.data.order import PLAN_KEY, Plan, units_begun
from sae_dist.data.source import ActivationSource
from sae_dist.eval.learning_curves import CURVE_FILE, checkpoint_curve, crossing, plot_curves
from sae_dist.flops import flops_per_token
from sae_dist.run_dir import latest_checkpoint
from sae_dist.train.run import train_from_config
from sae_dist.validation import validate

RECIPES: dict[str, dict[str, object]] = {
    "paper": {},
    "expert_lr": {"lr_rule": "expert"},
    "expert_lr_auxk_routed": {"lr_rule": "expert", "auxk_alpha": 1 / 32, "dead_count": "routed"},
    "expert_lr_auxk": {"lr_rule": "expert", "auxk_alpha": 1 / 32},
    "expert_lr_auxk_gao": {"lr_rule": "expert", "auxk_alpha": 1 / 32, "auxk_scale": "gao"},
    # Every 500 steps: twice the steps after which a latent can be dead (--dead-tokens 1M / batch 4096 = 245), the
    # ratio of Anthropic's schedule (dead after 12.5k steps, resampled every 25k), so a resampled latent has a full
    # window to fire before it can be resampled again; at 10M token-steps (2,441 steps, lr decay from step 1,953)
    # that is steps 500, 1000 and 1500. Dead counted in batch tokens: under dead_count=routed no latent could be dead
    # before the decay.
    "expert_lr_resample": {"lr_rule": "expert", "resample_every": 500},
}
"""Recipes for the Switch SAEs: trainer.lr_rule and sae.* settings (the paper's recipe is every default)."""


def planned_runs(args: argparse.Namespace, recipes: list[str], d_out: int | None = None
                 ) -> dict[str, tuple[int, str, SAEConfig, str]]:
    """name -> (k, family, SAE config, lr rule) of every run under `recipes`, dense first; transcoders of target
    width `d_out` when it is set."""
    runs = {}
    m, n = args.width, args.experts
    for k in args.ks:
        for scale in args.dense_auxk_scales:
            name = "dense" if scale == "x_variance" else f"dense_auxk_{scale}"
            runs[f"{name}_k{k}"] = (k, "dense", SAEConfig(kind="topk", num_latents=m, num_experts=1, k=k,
                                                         dead_tokens=args.dead_tokens, d_out=d_out,
                                                         auxk_scale=scale), "total")
        for recipe in recipes:
            options = dict(RECIPES[recipe])
            lr_rule = str(options.pop("lr_rule", "total"))
            for family, total in (("flop_matched", m * n), ("width_matched", m)):
                sae = SAEConfig(kind="switch", num_latents=total, num_experts=n, k=k, dead_tokens=args.dead_tokens,
                                d_out=d_out, **options)
                runs[f"{family}_{recipe}_k{k}"] = (k, family, sae, lr_rule)
    return runs


def cache_model(manifest: dict) -> ModelConfig:
    """The model config of the site (and a transcoder's target site) a cache's rows were read at."""
    model, site, target = manifest["model"], manifest["site"], manifest.get("target_site")
    where = {"layer": site["layer"]} if site.get("layer") is not None else {"hookpoint": site["hookpoint"]}
    return ModelConfig(name=model["name"], path=model.get("path"), **where,
                       target_hookpoint=target["hookpoint"] if target else None)


def documents_held(manifest: dict) -> int | None:
    """How many documents a text cache holds rows of (None when its manifest does not record its readers' plans)."""
    states = manifest.get("source_states") or []
    if not states or not all(PLAN_KEY in state for state in states):
        return None
    return units_begun([Plan.from_state(state[PLAN_KEY]) for state in states])


def run_config(name: str, sae: SAEConfig, lr_rule: str, args: argparse.Namespace, model: ModelConfig) -> RunConfig:
    steps = args.tokens // args.batch_size
    every = max(steps // args.points, 1)
    run = RunConfig(
        name=name,
        sae=sae,
        model=model,
        data=DataConfig(source="cache", cache_dir=str(args.train_cache), shuffle_buffer=args.shuffle_buffer),
        trainer=TrainerConfig(batch_size=args.batch_size, steps=steps, lr_rule=lr_rule, log_every=every, seed=args.seed,
                              checkpoint_every=every, keep_checkpoints=args.points + 1,
                              out_dir=str(args.out / name), device="cpu", progress=False, tensorboard=False),
    )
    validate(run)
    return run


HELDOUT_PIECES = 256
"""Evenly spaced stretches of the held-out cache that the scored rows are taken from."""


class _Rows(ActivationSource):
    """Fixed rows served in order (to write them as a cache)."""

    def __init__(self, rows_ND: torch.Tensor) -> None:
        self.rows_ND, self.d_model, self.start = rows_ND, rows_ND.shape[1], 0

    def next_batch(self, batch_size: int) -> torch.Tensor:
        self.start += batch_size
        return self.rows_ND[self.start - batch_size : self.start]

    def state_dict(self) -> dict:
        return {"start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["start"]


def heldout_key(cache: Path, rows: int) -> str:
    """The identity of a held-out set: its cache's manifest (which holds every shard's SHA-256) and the rows."""
    return f"{hashlib.sha256((cache / MANIFEST).read_bytes()).hexdigest()[:16]}-{rows}"


def spread_heldout(cache: Path, rows: int, out: Path) -> Path:
    """A cache of `rows` rows of `cache` in HELDOUT_PIECES evenly spaced stretches (all of it when smaller), written
    once under `out`; returns its folder."""
    folder = out / f"heldout-{heldout_key(cache, rows)}"
    if (folder / MANIFEST).is_file():
        return folder
    reader = CacheUnitReader(cache, verify=True)
    total = reader.total_rows
    if rows >= total:
        picked = reader.read_rows(0, total)
    else:
        piece = -(-rows // HELDOUT_PIECES)
        starts = [i * (total - piece) // max(1, HELDOUT_PIECES - 1) for i in range(HELDOUT_PIECES)]
        picked = torch.cat([reader.read_rows(start, start + piece) for start in starts])[:rows]
    write_cache(_Rows(picked), folder, len(picked), len(picked), {"spread_from": str(cache), "pieces": HELDOUT_PIECES})
    return folder


def keyed_curve(run_dir: Path, heldout: Path, key: str) -> list:
    """`checkpoint_curve` with its stored scores kept per held-out set: curve.json holds those of the set named in
    curve.key, the others wait in curve.<key>.json (scores stored before keys existed are set aside as unkeyed)."""
    stored, key_file = run_dir / CURVE_FILE, run_dir / "curve.key"
    current = key_file.read_text().strip() if key_file.is_file() else "unkeyed"
    if current != key:
        if stored.is_file():
            stored.replace(run_dir / f"curve.{current}.json")
        if (run_dir / f"curve.{key}.json").is_file():
            (run_dir / f"curve.{key}.json").replace(stored)
    points = checkpoint_curve(run_dir, heldout)
    key_file.write_text(key + "\n")
    return points


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-cache", type=Path, required=True)
    parser.add_argument("--heldout-cache", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/repro"))
    parser.add_argument("--width", type=int, default=512, help="M of the dense TopK SAE")
    parser.add_argument("--experts", type=int, default=8, help="N of both Switch SAEs")
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--tokens", type=int, default=10_000_000, help="training token-steps per run")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--points", type=int, default=8, help="checkpoints (curve points) per run")
    parser.add_argument("--dead-tokens", type=int, default=1_000_000,
                        help="sae.dead_tokens (the paper's 10M is for 819M-token runs)")
    parser.add_argument("--heldout-rows", type=int, default=65_536, help="held-out rows each checkpoint is scored on")
    parser.add_argument("--seed", type=int, default=0, help="trainer.seed of every run")
    parser.add_argument("--shuffle-buffer", type=int, default=262_144)
    parser.add_argument("--recipes", nargs="+", default=["paper", "expert_lr"], choices=sorted(RECIPES))
    parser.add_argument("--dense-auxk-scales", nargs="+", default=["x_variance"], choices=AUXK_SCALES,
                        help="a dense TopK baseline per AuxK scale (sae.auxk_scale)")
    parser.add_argument("--only", nargs="+", default=None,
                        help="train only these runs (names as printed; any recipe's, whatever --recipes)")
    parser.add_argument("--report-only", action="store_true", help="train nothing; evaluate and plot what exists")
    args = parser.parse_args()
    for cache in (args.train_cache, args.heldout_cache):
        if not (cache / "manifest.json").is_file():
            parser.error(f"{cache} holds no activation cache (manifest.json); write one with "
                         "launch/cache_activations.py")
    train_manifest, heldout_manifest = read_manifest(args.train_cache), read_manifest(args.heldout_cache)
    if "site" not in train_manifest:
        parser.error(f"--train-cache {args.train_cache} records no site; write it with launch/cache_activations.py")
    model = cache_model(train_manifest)
    mismatch = cache_site_mismatch(heldout_manifest, model)
    if mismatch:
        parser.error(f"--heldout-cache {args.heldout_cache} holds {mismatch.split(';')[0]} (the training cache's)")
    d_out = cache_target_width(train_manifest)
    train_rows = CacheUnitReader(args.train_cache)
    d_in = train_rows.d_model - (d_out or 0)
    # --only may name a run of any recipe, without --recipes
    runs = planned_runs(args, list(RECIPES) if args.only else args.recipes, d_out)
    unknown = sorted(set(args.only or []) - set(runs))
    if unknown:
        parser.error(f"--only {unknown[0]} is not a run of this plan; runs: {', '.join(runs)}")
    console = Console(width=200)

    for name, (k, family, sae, lr_rule) in runs.items():
        if args.report_only or (args.only and name not in args.only):
            continue
        run = run_config(name, sae, lr_rule, args, model)
        last = latest_checkpoint(args.out / name)
        if last is not None and last.name.endswith(f"{run.trainer.steps:08d}"):
            continue
        start = time.perf_counter()
        train_from_config(run, eval_batches=1)
        console.print(f"{name}: trained in {time.perf_counter() - start:.0f} s")
    if args.only:
        return

    results, curves = [], {}
    key = heldout_key(args.heldout_cache, args.heldout_rows)
    heldout = spread_heldout(args.heldout_cache, args.heldout_rows, args.out)
    for name, (k, family, sae, lr_rule) in runs.items():
        if latest_checkpoint(args.out / name) is None:
            continue
        points = keyed_curve(args.out / name, heldout, key)
        per_token = flops_per_token(sae, d_in).encoder_paper
        label = name.removesuffix(f"_k{k}")
        curves.setdefault(k, {})[label] = ([p.tokens for p in points], [p.tokens * per_token for p in points],
                                           [p.mse for p in points])
        results.append({"run": name, "k": k, "family": family, "num_latents": sae.num_latents,
                        "num_experts": sae.num_experts, "lr_rule": lr_rule, "dead_count": sae.dead_count,
                        "auxk_alpha": sae.auxk_alpha, "auxk_scale": sae.auxk_scale,
                        "resample_every": sae.resample_every, "encoder_flops_per_token": per_token,
                        "points": [vars(p) for p in points]})

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    widths = f"d_in = {d_in}, d_out = {d_out}" if d_out else f"d = {d_in}"
    passes = args.tokens / train_rows.total_rows
    held = documents_held(heldout_manifest)
    heldout_words = f"{args.heldout_rows:,} held-out rows" + (f" of {held} documents" if held is not None else "")
    header = (f"{stamp}, {machine()}, load {load[0]:.1f}; dense M = {args.width}, Switch N = {args.experts}, "
              f"batch {args.batch_size}, {widths}, seed {args.seed}; {passes:.2g} passes over the training cache, "
              f"{heldout_words}")
    for k, by_label in sorted(curves.items()):
        dense = by_label.get("dense")
        table = Table(title=f"held-out MSE{' of the target y' if d_out else ''}, k = {k} ({header})")
        token_counts = sorted({t for tokens, _, _ in by_label.values() for t in tokens})
        table.add_column("run")
        for t in token_counts:
            table.add_column(f"{t / 1e6:.3g}M", justify="right")
        for column in ("FVU", "dead", "below dense at (tokens | FLOPs)"):
            table.add_column(column, justify="right")
        for label, (tokens, flops, mse) in sorted(by_label.items()):
            result = next(r for r in results if r["run"] == f"{label}_k{k}")
            last = result["points"][-1]
            cells = [f"{mse[tokens.index(t)]:.2f}" if t in tokens else "" for t in token_counts]
            below = ""
            if dense is not None and label != "dense":
                at_tokens = crossing(tokens, mse, dense[0], dense[2])
                at_flops = crossing(flops, mse, dense[1], dense[2])
                below = (f"{at_tokens / 1e6:.2g}M" if at_tokens else "never") + " | " + (
                    f"{at_flops:.2g}" if at_flops else "never")
                result["below_dense_at"] = {"tokens": at_tokens, "flops": at_flops}
            table.add_row(label, *cells, f"{last['fvu']:.4f}", str(last["dead"]), below)
        console.print(table)

    args.out.mkdir(parents=True, exist_ok=True)
    title = f"{describe_cache(train_manifest)}: {header}"
    every_label = [f"{family}_{recipe}" for family in ("flop_matched", "width_matched") for recipe in RECIPES]
    png = plot_curves(curves, args.out / "curves.png", title, every_label) if curves else None  # one colour a recipe
    (args.out / "results.json").write_text(json.dumps({"date": stamp, "machine": machine(), "load": load,
                                                       "args": {k: str(v) for k, v in vars(args).items()},
                                                       "passes": passes, "heldout_documents": held,
                                                       "runs": results}, indent=1))
    console.print(f"curves: {png}\nresults: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
