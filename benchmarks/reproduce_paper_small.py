"""The paper's main comparison at reduced scale, offline on CPU: dense TopK vs FLOP-matched vs width-matched Switch.

    python benchmarks/reproduce_paper_small.py [--out runs/repro] [--width 2048] [--experts 4] [--steps 600]

MiniLM-L6 block-3 activations (d = 384) over CPython's documentation are cached once (`OUT/cache/train`, and a
disjoint held-out slice in `OUT/cache/heldout`; both reused when present). Then, at each k, three SAEs train on the
cache with the paper's recipe scaled down: the same batch and steps for all, and the paper's lr rule
2e-4 / sqrt(M / 2^14) times --lr-scale (default 4: a few hundred steps instead of 100k need larger steps; the
factor is the same for every run, so the rule's ratio between widths is kept):
- dense TopK of width M (the baseline);
- FLOP-matched Switch: N experts, each as wide as the dense SAE (total N * M latents, same encoder FLOPs);
- width-matched Switch: the same total M split over N experts (N times fewer encoder FLOPs).
Each is evaluated on the held-out activations (MSE in the paper's unit, FVU, L0), a table is printed beside the
encoder FLOPs per token from `sae_dist.flops`, and the MSE-vs-L0 frontier is drawn to OUT/pareto.png.
A run whose folder already holds a checkpoint is not trained again, so an interrupted reproduction continues.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sae_dist.api import load_sae
from sae_dist.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    SAEConfig,
    TrainerConfig,
    as_dict,
    validate,
)
from sae_dist.data import build_activation_source, write_cache
from sae_dist.data.cache import MANIFEST, CacheUnitReader
from sae_dist.eval.plots import plot_pareto
from sae_dist.eval.runs import RunPoint, run_family
from sae_dist.flops import flops_per_token
from sae_dist.metrics import ReconstructionSums
from sae_dist.models.base import default_lr
from sae_dist.run_dir import latest_checkpoint
from sae_dist.train.run import train_from_config

SHARD_TOKENS = 32768


def build_caches(out: Path, train_tokens: int, heldout_tokens: int) -> tuple[Path, Path]:
    """Write the train and held-out caches from one pass over the text (held-out = the tokens after train)."""
    train_dir, heldout_dir = out / "cache" / "train", out / "cache" / "heldout"
    if (train_dir / MANIFEST).exists() and (heldout_dir / MANIFEST).exists():
        return train_dir, heldout_dir
    producer = RunConfig(
        model=ModelConfig(name="minilm-bundled", layer=3),
        data=DataConfig(source="lm", dataset="python-docs", streaming=False, ctx_len=128, lm_batch_size=32,
                        shuffle_buffer=65536),
    )
    validate(producer)
    start = time.perf_counter()
    source = build_activation_source(producer)
    write_cache(source, train_dir, train_tokens, SHARD_TOKENS, config=as_dict(producer))
    write_cache(source, heldout_dir, heldout_tokens, SHARD_TOKENS, config=as_dict(producer))
    print(f"activation caches written in {time.perf_counter() - start:.0f} s: {train_dir}, {heldout_dir}")
    return train_dir, heldout_dir


def sae_configs(width: int, experts: int, k: int) -> dict[str, SAEConfig]:
    return {
        "topk": SAEConfig(kind="topk", num_latents=width, num_experts=1, k=k),
        "flop_matched": SAEConfig(kind="switch", num_latents=width * experts, num_experts=experts, k=k),
        "width_matched": SAEConfig(kind="switch", num_latents=width, num_experts=experts, k=k),
    }


@torch.no_grad()
def heldout_metrics(run_dir: Path, heldout_dir: Path, batch: int = 4096) -> dict[str, float]:
    """MSE, FVU and L0 of the run's final SAE over every held-out activation."""
    sae = load_sae(run_dir)
    reader = CacheUnitReader(heldout_dir)
    total = reader.total_rows
    sums = None
    for start in range(0, total, batch):
        x_TD = reader.read_rows(start, min(start + batch, total))
        latents = sae.encode(x_TD)
        part = ReconstructionSums.of_batch(x_TD, sae.decode(latents), (latents.values_TK > 0).sum())
        sums = part if sums is None else sums + part
    return sums.metrics()


def train_one(name: str, sae: SAEConfig, args: argparse.Namespace, train_dir: Path) -> tuple[RunConfig, float]:
    """Train (unless already done) and return the run config and the training seconds (0 when reused)."""
    run = RunConfig(
        name=name,
        sae=sae,
        model=ModelConfig(name="minilm-bundled", layer=3),
        data=DataConfig(source="cache", cache_dir=str(train_dir), shuffle_buffer=65536),
        trainer=TrainerConfig(batch_size=args.batch_size, steps=args.steps, lr=default_lr(sae) * args.lr_scale,
                              log_every=max(args.steps // 20, 1),
                              checkpoint_every=args.steps, keep_checkpoints=1, out_dir=str(args.out / name),
                              device="cpu", progress=False, tensorboard=False),
    )
    validate(run)
    if latest_checkpoint(args.out / name) is not None:
        return run, 0.0
    start = time.perf_counter()
    train_from_config(run, eval_batches=1)
    return run, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/repro"))
    parser.add_argument("--width", type=int, default=2048, help="M of the dense TopK SAE")
    parser.add_argument("--experts", type=int, default=4, help="N of both Switch SAEs")
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr-scale", type=float, default=4.0, help="factor on the paper's lr rule")
    parser.add_argument("--train-tokens", type=int, default=327_680)
    parser.add_argument("--heldout-tokens", type=int, default=32_768)
    args = parser.parse_args()
    torch.manual_seed(0)
    begin = time.perf_counter()
    train_dir, heldout_dir = build_caches(args.out, args.train_tokens, args.heldout_tokens)
    d_model = CacheUnitReader(train_dir).d_model

    points, rows = [], []
    for k in args.ks:
        for family, sae in sae_configs(args.width, args.experts, k).items():
            name = f"{family}_k{k}"
            run, seconds = train_one(name, sae, args, train_dir)
            metrics = heldout_metrics(args.out / name, heldout_dir)
            tokens = args.steps * args.batch_size
            points.append(RunPoint(name=name, run=run, d_model=d_model, tokens=tokens, **metrics))
            rows.append((name, sae, metrics, flops_per_token(sae, d_model).encoder_paper, seconds))
            print(f"{name}: MSE {metrics['mse']:.2f} ({seconds:.0f} s)", flush=True)

    header = (f"{'run':<18} {'kind':<24} {'M':>6} {'N':>3} {'k':>3} {'MSE':>8} {'FVU':>7} {'L0':>6} "
              f"{'enc MFLOP/tok':>13}")
    print("\n" + header + "\n" + "-" * len(header))
    for name, sae, m, enc_flops, _ in rows:
        family = run_family(points, next(p for p in points if p.name == name))
        print(f"{name:<18} {family:<24} {sae.num_latents:>6} {sae.num_experts:>3} {sae.k:>3} {m['mse']:>8.2f} "
              f"{m['fvu']:>7.4f} {m['l0']:>6.1f} {enc_flops / 1e6:>13.2f}")
    title = f"MiniLM block 3, python-docs: dense M={args.width}, Switch N={args.experts}"
    png = plot_pareto(points, args.out / "pareto.png", title=title)
    summary = [{"run": name, "num_latents": sae.num_latents, "num_experts": sae.num_experts, "k": sae.k, **m,
                "encoder_flops_per_token": f, "train_seconds": s} for name, sae, m, f, s in rows]
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"\nPareto plot: {png}\nresults: {args.out / 'results.json'}\ntotal {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
