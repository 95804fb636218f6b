"""The TopK selection over an SAE's pre-activations: torch.topk against a two-stage TopK at several chunk widths,
beside the floor of one read of the tensor, measured in one process.

The two-stage TopK takes the TopK of every chunk of columns, then the TopK of those candidates: the k largest of a
row are among its chunks' k largest, so it selects what torch.topk selects (checked before timing). Whether it
pays decides whether the training step should select that way: dense TopK SAEs of 2^18 latents and more select
over rows of that width, where torch.topk on a GPU reads the whole [B, M] tensor from memory at every pass of
its radix select (more than one block per row), while on short rows it keeps a row in one block's cache. Rows are
[B, M] pre-activations (bf16 on a GPU, float32 on a CPU), k = 32; each figure is the median of `--repeats`
timings after 2 warm-ups.

    python benchmarks/bench_topk.py --device cuda                   # B = 8192, M = 8192 .. 2^20
    python benchmarks/bench_topk.py --device cpu                    # B = 512, M = 8192 .. 2^18
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from bench_data import copy_bandwidth, machine_line, synchronize
from bench_step import Clock
from rich.console import Console
from rich.table import Table



def two_stage_topk(pre_BM: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, columns) of the k largest of each row: the TopK of every `chunk` columns, then of those candidates."""
    rows, width = pre_BM.shape
    values_BCK, columns_BCK = torch.topk(pre_BM.view(rows, width // chunk, chunk), k, dim=-1, sorted=False)
    values_BK, picks_BK = torch.topk(values_BCK.flatten(1), k, dim=-1, sorted=False)
    columns_BK = columns_BCK.flatten(1).gather(1, picks_BK) + picks_BK.div(k, rounding_mode="floor") * chunk
    return values_BK, columns_BK


def same_selection(got: tuple[torch.Tensor, torch.Tensor], pre_BM: torch.Tensor, k: int) -> bool:
    """Whether `got` holds torch.topk's values, each at a column that holds it."""
    values_BK, columns_BK = got
    expected = torch.topk(pre_BM, k, dim=-1).values
    return torch.equal(values_BK.sort(dim=1, descending=True).values, expected) and torch.equal(
        pre_BM.gather(1, columns_BK), values_BK)


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    clock = Clock(device)
    for _ in range(2):
        fn()
    synchronize(device)
    return statistics.median(clock(fn) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, help="rows B (default: 8192 on a GPU, 512 on a CPU)")
    parser.add_argument("--latents", type=int, nargs="+", help="widths M (default: 2^13 .. 2^20 on a GPU, "
                        "2^13 .. 2^18 on a CPU)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 4096, 16384],
                        help="two-stage chunk widths (on a GPU, torch.topk keeps a row of under 400 in one block "
                             "when there are more than 4000 rows)")
    parser.add_argument("-k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here; use --device cpu", file=sys.stderr)
        sys.exit(2)
    cuda = args.device == "cuda"
    args.batch = args.batch or (8192 if cuda else 512)
    args.latents = args.latents or [2**p for p in (13, 15, 16, 18, 20)[: 5 if cuda else 4]]
    for name, values in (("batch", [args.batch]), ("latents", args.latents), ("chunks", args.chunks),
                         ("k", [args.k]), ("repeats", [args.repeats])):
        if min(values) < 1:
            print(f"--{name}={min(values)}: must be at least 1", file=sys.stderr)
            sys.exit(2)
    device, dtype = torch.device(args.device), torch.bfloat16 if cuda else torch.float32
    bandwidth = copy_bandwidth(device)

    table = Table(title=f"TopK (k = {args.k}) over [{args.batch}, M] {str(dtype).removeprefix('torch.')} "
                        f"pre-activations, {args.device}, median of {args.repeats}")
    for column in ("M", "selection", "ms", "floor ms", "x floor", "vs torch.topk"):
        table.add_column(column, justify="left" if column == "selection" else "right")
    for width in args.latents:
        pre_BM = torch.randn(args.batch, width, device=device, dtype=dtype)
        floor = pre_BM.numel() * pre_BM.element_size() / bandwidth
        variants = {"torch.topk": lambda pre=pre_BM: torch.topk(pre, args.k, dim=-1, sorted=False)}
        for chunk in args.chunks:
            if width % chunk == 0 and width > chunk >= args.k:
                variants[f"two stages, chunks of {chunk}"] = (
                    lambda pre=pre_BM, chunk=chunk: two_stage_topk(pre, args.k, chunk))
        base = None
        for name, fn in variants.items():
            if not same_selection(fn(), pre_BM, args.k):
                raise AssertionError(f"{name} at M = {width} did not select torch.topk's values")
            seconds = median_seconds(fn, device, args.repeats)
            base = base or seconds
            table.add_row(f"{width:,}", name, f"{seconds * 1e3:,.2f}", f"{floor * 1e3:,.2f}", f"{seconds / floor:.1f}",
                          f"{base / seconds:.2f}x")
        del pre_BM
        if cuda:
            torch.cuda.empty_cache()
    console = Console(width=160)
    console.print(table)
    console.print(f"machine: {machine_line(device)}; floor: one read of the tensor at the measured copy "
                  f"bandwidth, {bandwidth / 1e9:,.1f} GB/s")


if __name__ == "__main__":
    main()
