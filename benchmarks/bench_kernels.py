"""Does the Switch SAE realise its FLOP saving? Forward + backward time of one training step's model part.

Compares, on the same weights and batch, this project's expert-grouped sparse Switch SAE with the authors'
dense-then-mask formulation (`sae_dist.models.reference.naive_forward`, every expert's encoder on every token)
and with a dense TopK SAE of the same total width. Prints a table with ratios against the naive baseline, which
runs in the same process.

    python benchmarks/bench_kernels.py [--d 384] [--latents 16384] [--experts 8] [--k 32] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import time

import torch

from sae_dist.config import SAEConfig
from sae_dist.models import build_sae
from sae_dist.models.losses import total_loss
from sae_dist.models.reference import naive_forward


def time_step(step, repeats: int) -> float:
    """Median seconds of `step()` over `repeats` runs after one warm-up."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    x_TD = torch.randn(args.tokens, args.d) * 3

    switch = build_sae(SAEConfig(num_latents=args.latents, num_experts=args.experts, k=args.k), args.d, seed=0)
    topk = build_sae(SAEConfig(kind="topk", num_latents=args.latents, num_experts=1, k=args.k), args.d, seed=0)
    weights = switch.loss_weights(0.0)

    def sparse_step(model):
        def step():
            model.zero_grad(set_to_none=True)
            out = model(x_TD)
            total_loss(model.loss_terms(x_TD, out), model.loss_weights(0.0)).backward()
        return step

    def naive_step():
        switch.zero_grad(set_to_none=True)
        _, _, terms = naive_forward(switch, x_TD)
        total_loss(terms, weights).backward()

    rows = [
        ("Switch, dense-then-mask (authors' formulation)", naive_step, args.latents),
        ("Switch, expert-grouped sparse (sae-dist)", sparse_step(switch), args.latents // args.experts),
        ("dense TopK, same width M (sae-dist kernels)", sparse_step(topk), args.latents),
    ]
    print(f"d={args.d} M={args.latents} N={args.experts} k={args.k} tokens={args.tokens} "
          f"threads={torch.get_num_threads()} (forward + backward, median of {args.repeats})")
    print(f"{'model':<50} {'ms/step':>9} {'tokens/s':>10} {'encoder GFLOP':>14} {'speed-up':>9}")
    baseline = None
    for name, step, encoder_width in rows:
        seconds = time_step(step, args.repeats)
        baseline = baseline or seconds
        encoder_gflop = 6 * encoder_width * args.d * args.tokens / 1e9  # forward 2Md + backward 4Md per token
        print(f"{name:<50} {1e3 * seconds:>9.1f} {args.tokens / seconds:>10,.0f} {encoder_gflop:>14.2f} "
              f"{baseline / seconds:>8.2f}x")


if __name__ == "__main__":
    main()
