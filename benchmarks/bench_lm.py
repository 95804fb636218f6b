"""The language model's forward to the hooked block, the training job's slowest stage on a GPU: each way to run it
beside its GEMM floor, measured in one process.

Rows: the model as transformers builds it (GPT-2's tanh GELU as a chain of elementwise operators), as `load_lm`
runs it (that GELU as one kernel, `fuse_tanh_gelu`), on a CPU also with freed host memory kept for reuse as the
launch commands keep it (`host_memory`), and with `model.compile=true` (its blocks compiled; on a CPU with the
memory kept), each through `HookedLM.capture` as the 'lm' source calls it: `--contexts` contexts of `--ctx`
random token ids, no padding, up to block `--layer`. The variants take turns, round after round, so that a shared
machine's load drifts over all of them alike; each figure is the median over the rounds. The floor is the measured GEMM rate
over the forward's FLOPs per token (2 x the blocks' parameters plus attention).

    python benchmarks/bench_lm.py --device cpu                      # GPT-2 small (random weights) to block 8
    python benchmarks/bench_lm.py --device cuda --contexts 256      # bf16, as the job runs it on a GPU
    python benchmarks/bench_lm.py --lm minilm --device cpu          # the bundled MiniLM-L6 to block 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import numpy as np
import torch
from bench_data import Rate, cpu_seconds, gemm_flops, lm_flops_per_token, machine_line, synchronize
from rich.console import Console
from rich.table import Table
from transformers import GPT2Config, GPT2Model

from sae_dist.config import ModelConfig, resolve_dtype
from sae_dist.data import HookedLM, load_lm
from sae_dist.data.lm import fuse_tanh_gelu
from sae_dist.host_memory import keep_freed_host_memory

MODELS = {"gpt2": (8, 12, 1024), "minilm": (3, 6, 512)}
"""Per --lm: the default hooked block, the number of blocks and the longest context."""


def build_models(lm: str, device: torch.device) -> dict[str, torch.nn.Module]:
    """The variants' models, in the device's default LM dtype: the same weights, ways to run them."""
    dtype = getattr(torch, resolve_dtype("auto", device.type))
    if lm == "minilm":
        loaded, _ = load_lm(ModelConfig(name="minilm-bundled"), device)
        return {"load_lm": loaded}
    torch.manual_seed(0)
    built = GPT2Model(GPT2Config()).to(device, dtype).eval().requires_grad_(False)
    fused = copy.deepcopy(built)
    fuse_tanh_gelu(fused)
    return {"transformers (GELU as elementwise operators)": built, "load_lm (GELU as one kernel)": fused}


def measure(args) -> tuple[dict[str, Rate], float, float]:
    """(median Rate per variant, the forward's floor tokens/s, the measured GEMM FLOP/s)."""
    device = torch.device(args.device)
    models = build_models(args.lm, device)
    last = list(models.values())[-1]
    kept = f"{list(models)[-1]}, freed host memory kept"
    if device.type == "cpu":
        models[kept] = last
    compiled = "model.compile (blocks compiled)" + (", freed host memory kept" if device.type == "cpu" else "")
    models[compiled] = copy.deepcopy(last)
    lms = {name: HookedLM(model, args.layer, compile_blocks=name == compiled) for name, model in models.items()}
    keeps = {name: "host memory kept" in name for name in lms}
    rng = np.random.default_rng(0)
    vocab = last.config.vocab_size
    contexts = [rng.integers(0, vocab, args.ctx).astype(np.int32) for _ in range(args.contexts)]
    tokens = args.contexts * args.ctx

    def forward(name: str) -> None:
        if device.type == "cpu":  # a GPU's activations are not the host's
            keep_freed_host_memory(keeps[name])
        lms[name].capture(contexts, pad_id=0)
        synchronize(device)

    for name in lms:  # warm-up: compilation, the allocator, cuBLAS's choices
        for _ in range(2):
            forward(name)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in lms}
    for _ in range(args.rounds):
        for name in lms:
            start, start_cpu = time.perf_counter(), cpu_seconds()
            forward(name)
            times[name].append((time.perf_counter() - start, cpu_seconds() - start_cpu))
    rates = {name: Rate(tokens / statistics.median(t for t, _ in pairs),
                        tokens / statistics.median(c for _, c in pairs)) for name, pairs in times.items()}
    dtype = next(last.parameters()).dtype
    peak = gemm_flops(device, dtype)
    return rates, peak / lm_flops_per_token(last, args.layer, args.ctx), peak


def print_table(args, rates: dict[str, Rate], floor: float, peak: float) -> None:
    title = (f"{args.lm} forward to block {args.layer}, {args.contexts} contexts x {args.ctx} tokens, {args.device}, "
             f"median of {args.rounds} rounds")
    table = Table(title=title)
    for column in ("variant", "ms/forward", "tokens/s", "floor tokens/s", "of floor", "tokens per CPU-s", "speed-up"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    baseline = next(iter(rates.values())).wall
    tokens = args.contexts * args.ctx
    for name, rate in rates.items():
        table.add_row(name, f"{tokens / rate.wall * 1e3:,.1f}", f"{rate.wall:,.0f}", f"{floor:,.0f}",
                      f"{rate.wall / floor:.0%}", f"{rate.cpu:,.0f}", f"{rate.wall / baseline:.2f}x")
    console = Console(width=160)
    console.print(table)
    console.print(f"machine: {machine_line(torch.device(args.device))}; measured GEMM {peak / 1e9:,.0f} GFLOP/s")
    print(json.dumps({name: rate._asdict() for name, rate in rates.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", choices=tuple(MODELS), default="gpt2")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--layer", type=int, help="the hooked block (default: 8 for gpt2, 3 for minilm)")
    parser.add_argument("--contexts", type=int, help="contexts per forward (default: 64 on a CPU, 256 on a GPU)")
    parser.add_argument("--ctx", type=int, default=128, help="tokens per context")
    parser.add_argument("--rounds", type=int, default=5, help="turns of every variant, after 2 warm-up forwards")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here; use --device cpu", file=sys.stderr)
        sys.exit(2)
    default_layer, blocks, longest = MODELS[args.lm]
    args.layer = default_layer if args.layer is None else args.layer
    limits = {"layer": (0, blocks - 1), "contexts": (1, None), "ctx": (1, longest), "rounds": (1, None)}
    for name, (low, high) in limits.items():
        value = getattr(args, name)
        if value is not None and (value < low or (high is not None and value > high)):
            allowed = f"{low}..{high}" if high is not None else f"at least {low}"
            print(f"--{name}={value}: must be {allowed} for --lm {args.lm}", file=sys.stderr)
            sys.exit(2)
    args.contexts = args.contexts or (256 if args.device == "cuda" else 64)
    print_table(args, *measure(args))


if __name__ == "__main__":
    main()
