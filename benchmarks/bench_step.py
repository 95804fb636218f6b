"""The full training step against its GEMM floors and the best peer, measured in one process.

A step is what one optimizer update costs: forward, loss, backward, projection, Adam with the clip, decoder
renormalisation (sparsify's own step has no clip). Rows, at each M: sae-dist's Switch SAE for each N > 1 and its dense TopK SAE (N = 1) with
AuxK off and with AuxK on while 10% of the latents are dead; eai-sparsify's dense TopK step as its Trainer runs it
(AuxK off, its default; the optional `bench` extra); and the authors' dense-then-mask formulation of the Switch SAE
(`tests/reference.py`'s `reference_train_step`, at the first N > 1).

Floors: the dense GEMM x[B, d] @ W[d, M] and the routed GEMM x[B, d] @ W[d, M/N], the encoder forward of a dense
and of a Switch SAE. The machine is shared and its load drifts, so every measured step is paired with a routed-GEMM
timing taken just before it: "x routed floor" is the median of step / floor over the pairs, and "vs sparsify" is
the ratio of the two implementations' floor multiples (each implementation at its own N's floor is converted to
the N = 1 floor by the floors' median ratio), so slow phases of the machine cancel out. On a GPU, which nothing
else shares, "vs sparsify" is the plain ratio of the two steps' medians. On a CPU the process keeps freed host
memory for reuse, as the launch commands run (`sae_dist.host_memory`), and gives it back before each
implementation, so that the peak-memory column reads that implementation's own resident set.

    python benchmarks/bench_step.py --device cpu                    # d = 768, k = 32, B = 4096, M = 16384, 65536
    python benchmarks/bench_step.py --device cuda                   # B = 8192, M up to 2^20, bf16 autocast
    python benchmarks/bench_step.py --latents 65536 --experts 1 8   # a subset
    python benchmarks/bench_step.py --device cuda --latents 65536 --experts 8 --no-peers --profile 15
    python benchmarks/bench_step.py --latents 16384 --experts 8 --no-peers --transcoder --skip

`--transcoder` adds, after each sae-dist row, the same step as a transcoder from d to d_out = d (docs/math.md section 9:
its batch rows are [x | y], y a known map of x), and `--skip` one with the skip connection; the lines below the
table give each one's time over its SAE's, the median over steps of the two run alternately (so that the machine's
load drifts alike for both).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sae_dist.config import DataConfig, RunConfig, SAEConfig, TrainerConfig
from sae_dist.data.synthetic import SyntheticSource
from sae_dist.host_memory import keep_freed_host_memory, release_freed_host_memory
from sae_dist.models import build_sae
from sae_dist.train.init import init_biases_from_batch
from sae_dist.train.profiling import operator_table, profiler_for
from sae_dist.train.step import build_step
from sae_dist.validation import validate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the dense oracle lives in tests/, beside the package
from tests.reference import reference_train_step  # noqa: E402

GIB = 2**30


class Clock:
    """Wall time of a callable: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


class PeakMemory:
    """Peak memory of what is built and run inside the block: CUDA's allocator peak, or the process's peak
    resident set on a CPU (Linux: reset through /proc/self/clear_refs), above the level at entry, where the
    memory that malloc kept from earlier blocks is first given back to the system."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            release_freed_host_memory()
            Path("/proc/self/clear_refs").write_text("5")
            self.start = self._status("VmRSS")
        self.peak = 0
        return self

    def __exit__(self, *exc) -> None:
        peak = torch.cuda.max_memory_allocated() if self.cuda else self._status("VmHWM")
        self.peak = peak - self.start

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")


def gemm_floor(batch: int, d: int, width: int, device: torch.device, dtype: torch.dtype) -> Callable[[], object]:
    x_BD = torch.randn(batch, d, device=device, dtype=dtype)
    w_DM = torch.randn(d, width, device=device, dtype=dtype)
    return lambda: x_BD @ w_DM


def sae_dist_step(kind: str, latents: int, experts: int, args, x_BD: torch.Tensor, dead_fraction: float = 0.0,
                  optimizer_state: str = "float32", cuda_graph: bool = False, d_out: int | None = None,
                  skip: bool = False):
    """The training step of a Switch (or dense TopK) SAE; AuxK on only when `dead_fraction` > 0. With `d_out`, a
    transcoder (`skip`: with the skip connection) whose batch `x_BD` is the rows [x | y]."""
    run = RunConfig(
        sae=SAEConfig(kind=kind, num_latents=latents, num_experts=experts, k=args.k,
                      auxk_alpha=1 / 32 if dead_fraction else 0.0,
                      encoder_backward_kernel=args.encoder_backward_kernel, decoder_kernel=args.decoder_kernel,
                      d_out=d_out, skip=skip),
        data=DataConfig(source="synthetic", d_model=args.d),
        trainer=TrainerConfig(batch_size=args.batch, steps=10**6, progress=False, tensorboard=False,
                              device=args.device, dtype=args.dtype, optimizer_state=optimizer_state,
                              cuda_graph=cuda_graph),
    )
    validate(run)
    step = build_step(run, args.d, device=args.device)
    init_biases_from_batch(step.model, x_BD)
    tokens = 0
    if dead_fraction:
        g = torch.Generator().manual_seed(0)
        dead_L = (torch.rand(latents, generator=g) < dead_fraction).to(x_BD.device)
        step.latents.dead.tokens_since_fired_L.masked_fill_(dead_L, run.sae.dead_tokens)
        tokens = run.sae.dead_tokens  # the counters say so; AuxK runs from the first step
    return lambda: step(x_BD, 0, tokens)


def sparsify_step(latents: int, args, x_BD: torch.Tensor):
    """eai-sparsify's step as its Trainer runs it: decoder renorm, forward (bf16 autocast on CUDA), FVU backward,
    parallel-gradient removal, torch Adam at its lr rule; no clip, AuxK off (its defaults)."""
    if x_BD.device.type != "cuda":  # its Triton decoder, imported whenever Triton is installed, needs a GPU driver
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(args.d, SparseCoderConfig(num_latents=latents, k=args.k), device=x_BD.device)
    sae.b_dec.data = x_BD.mean(0)
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / (latents / 2**14) ** 0.5)

    def step():
        sae.set_decoder_norm_to_unit_norm()
        sae(x_BD).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()

    return step


def dense_then_mask_step(latents: int, experts: int, args, x_BD: torch.Tensor):
    sae = build_sae(SAEConfig(num_latents=latents, num_experts=experts, k=args.k), args.d, seed=0).to(x_BD.device)
    init_biases_from_batch(sae, x_BD)
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / (latents / 2**14) ** 0.5)
    return lambda: reference_train_step(sae, optimizer, x_BD, 1.0)


GPU_STEPS_PER_TIMING = 5
"""Consecutive steps per CUDA-event timing on a GPU: as in training, the host queues a step while the GPU runs
the previous one (timing one step alone would add the host's start-up latency of every step)."""


def measure(build: Callable[[], Callable[[], object]], floor: Callable[[], object], repeats: int, clock: Clock,
            device: torch.device) -> dict:
    """Build, warm up, then `repeats` pairs of (routed floor, step): median step, median step / floor, peak. On a
    GPU a step's time is that of `GPU_STEPS_PER_TIMING` consecutive steps, divided."""
    per_timing = GPU_STEPS_PER_TIMING if device.type == "cuda" else 1
    with PeakMemory(device) as memory:
        one_step = build()
        for _ in range(3 if device.type == "cuda" else 1):  # CUDA: warm-up (and graph capture: step_graph.py)
            one_step()

        def step():
            for _ in range(per_timing):
                one_step()

        pairs = [(clock(floor), clock(step) / per_timing) for _ in range(repeats)]
    del step, one_step
    gc.collect()  # a trainer holds reference cycles: free its gigabytes before the next implementation
    return {"seconds": statistics.median(s for _, s in pairs),
            "per_floor": statistics.median(s / f for f, s in pairs), "peak": memory.peak}


def paired_ratio(build_base: Callable[[], Callable[[], object]], build_other: Callable[[], Callable[[], object]],
                 repeats: int, clock: Clock) -> float:
    """The median over `repeats` alternated pairs of (other step) / (base step), after one warm-up step each."""
    base, other = build_base(), build_other()
    base(), other()
    ratios = []
    for _ in range(repeats):
        base_s = clock(base)
        ratios.append(clock(other) / base_s)
    del base, other
    gc.collect()
    return statistics.median(ratios)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--latents", type=int, nargs="+", help="M values (default: 16384 65536 on CPU, "
                        "65536 262144 1048576 on CUDA)")
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 8, 32], help="N values (1 = dense TopK)")
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, help="tokens per step (default: 4096 on CPU, 8192 on CUDA)")
    parser.add_argument("--repeats", type=int, default=5, help="measured steps per implementation")
    parser.add_argument("--reference-repeats", type=int, default=2, help="measured dense-then-mask steps (0: skip)")
    parser.add_argument("--no-peers", action="store_true", help="skip sparsify and the dense-then-mask step")
    parser.add_argument("--encoder-backward-kernel", "--encoder-backward", default="auto",
                        choices=["auto", "sparse", "gemm"], help="sae.encoder_backward_kernel")
    parser.add_argument("--decoder-kernel", "--decoder", default="auto", choices=["auto", "gather", "gemm"],
                        help="sae.decoder_kernel")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="after the table, torch.profiler's top ROWS operators of the first M's narrowest "
                        "(dense TopK when N = 1 is timed) and widest steps")
    parser.add_argument("--bf16-state", action="store_true",
                        help="add a row for the widest Switch SAE with trainer.optimizer_state=bfloat16")
    parser.add_argument("--transcoder", action="store_true",
                        help="after each sae-dist row, the same step as a transcoder from d to d_out = d")
    parser.add_argument("--skip", action="store_true", help="with --transcoder: also a skip transcoder row")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here; use --device cpu", file=sys.stderr)
        sys.exit(2)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        keep_freed_host_memory()  # as the launch commands run (sae_dist.host_memory); sparsify's step gains too
    args.batch = args.batch or (8192 if cuda else 4096)
    args.dtype = "bfloat16" if cuda else "float32"
    latent_sizes = args.latents or ([65536, 262144, 1048576] if cuda else [16384, 65536])
    floor_dtype = torch.bfloat16 if cuda else torch.float32
    clock = Clock(device)
    x_BD = SyntheticSource.from_config(DataConfig(source="synthetic", d_model=args.d), seed=0).next_batch(args.batch)
    x_BD = x_BD.to(device)
    if args.skip and not args.transcoder:
        print("--skip adds a skip transcoder's row: it needs --transcoder", file=sys.stderr)
        sys.exit(2)
    pairs = SyntheticSource.from_config(DataConfig(source="synthetic", d_model=args.d), seed=0, d_out=args.d)
    rows_BC = pairs.next_batch(args.batch).to(device)  # [x | y]; its x is x_BD
    transcoder_variants = ([("transcoder", False)] + [("skip transcoder", True)] * args.skip) if args.transcoder else []
    ratios = []  # (label, N, step / SAE step in floor multiples)

    title = (f"Training step, d = {args.d}, k = {args.k}, B = {args.batch}, {args.dtype}; {machine(device)}; "
             f"torch {torch.__version__}; {datetime.date.today()}; load {os.getloadavg()[0]:.1f} at start; "
             f"formulation {args.encoder_backward_kernel}/{args.decoder_kernel}")
    table = Table(title=title)
    for column in ("step", "M", "N", "ms/step", "tokens/s", "peak GiB", "x routed floor", "x dense floor",
                   "vs sparsify"):
        table.add_column(column, justify="left" if column == "step" else "right")
    console = Console(width=200)
    for latents in latent_sizes:
        experts = [n for n in args.experts if latents % n == 0]
        floors = {n: gemm_floor(args.batch, args.d, latents // n, device, floor_dtype) for n in [1, *experts]}
        floor_s = {n: statistics.median(clock(floors[n]) for _ in range(3)) for n in floors}
        for n in sorted(floor_s):
            label = "GEMM floor, dense x @ W[d, M]" if n == 1 else f"GEMM floor, routed x @ W[d, M/{n}]"
            table.add_row(escape(label), str(latents), str(n), f"{floor_s[n] * 1e3:.1f}", "", "", "", "", "")
        rows = []  # (label, N, result)
        if not args.no_peers:
            rows.append(("eai-sparsify dense TopK (AuxK off)", 1,
                         measure(partial(sparsify_step, latents, args, x_BD), floors[1], args.repeats, clock, device)))
        for n in experts:
            kind = "topk" if n == 1 else "switch"
            label = "sae-dist dense TopK (AuxK off)" if n == 1 else "sae-dist Switch"
            rows.append((label, n, measure(partial(sae_dist_step, kind, latents, n, args, x_BD), floors[n],
                                           args.repeats, clock, device)))
            for variant, skip in transcoder_variants:
                build = partial(sae_dist_step, kind, latents, n, args, rows_BC, d_out=args.d, skip=skip)
                rows.append((f"{label} {variant}", n, measure(build, floors[n], args.repeats, clock, device)))
                ratio = paired_ratio(partial(sae_dist_step, kind, latents, n, args, x_BD), build, args.repeats, clock)
                ratios.append((f"{label} {variant}", latents, n, ratio))
            if n > 1 and cuda and n == max(experts) and latents == latent_sizes[0]:
                rows.append(("sae-dist Switch, CUDA graphs (trainer.cuda_graph=true)", n, measure(
                    partial(sae_dist_step, kind, latents, n, args, x_BD, cuda_graph=True), floors[n], args.repeats,
                    clock, device)))
            if n == 1:
                rows.append(("sae-dist dense TopK (AuxK on, 10% dead)", 1, measure(
                    partial(sae_dist_step, "topk", latents, 1, args, x_BD, 0.1), floors[1], args.repeats, clock,
                    device)))
        widest = max(experts)
        if args.bf16_state and widest > 1:
            rows.append(("sae-dist Switch, bf16 Adam moments", widest, measure(
                partial(sae_dist_step, "switch", latents, widest, args, x_BD, optimizer_state="bfloat16"),
                floors[widest], args.repeats, clock, device)))
        switch_n = next((n for n in experts if n > 1), None)
        if switch_n and args.reference_repeats and not args.no_peers:
            rows.append(("authors' dense-then-mask Switch", switch_n, measure(
                partial(dense_then_mask_step, latents, switch_n, args, x_BD), floors[switch_n],
                args.reference_repeats, clock, device)))
        # Floor multiples on the common scale of the N = 1 floor, for ratios between implementations.
        dense_multiple = {id(r): r["per_floor"] * floor_s[n] / floor_s[1] for _, n, r in rows}
        peer = rows[0][2] if not args.no_peers else None
        for label, n, result in rows:
            vs_peer = ""
            if peer:
                ratio = (peer["seconds"] / result["seconds"] if cuda
                         else dense_multiple[id(peer)] / dense_multiple[id(result)])
                vs_peer = f"{ratio:.2f}x"
            table.add_row(label, str(latents), str(n), f"{result['seconds'] * 1e3:.1f}",
                          f"{args.batch / result['seconds']:,.0f}", f"{result['peak'] / GIB:.2f}",
                          f"{result['per_floor']:.2f}", f"{dense_multiple[id(result)]:.2f}", vs_peer)
        console.print(f"M = {latents} done, load {os.getloadavg()[0]:.1f}")
    console.print(table)
    for label, latents, n, ratio in ratios:
        console.print(f"{label}, M = {latents}, N = {n}: {ratio:.3f}x its SAE's step (median of alternated pairs)")
    if args.skip:
        console.print(f"skip GEMMs: {2 * args.batch * args.d * args.d / 1e9:.2f} GFLOP forward, "
                      f"{4 * args.batch * args.d * args.d / 1e9:.2f} GFLOP backward per step (2·B·d_in·d_out, twice "
                      "that backward)")
    if args.profile:
        latents = latent_sizes[0]
        timed = [n for n in args.experts if latents % n == 0]
        for n in sorted({min(timed), max(timed)}):  # dense TopK (when timed) and the widest Switch SAE
            console.print(f"torch.profiler, 3 steps of {'dense TopK' if n == 1 else 'Switch'} M = {latents}, N = {n}:")
            console.print(profile_table(sae_dist_step("topk" if n == 1 else "switch", latents, n, args, x_BD), device,
                                        args.profile), soft_wrap=True)


def profile_table(step: Callable[[], object], device: torch.device, rows: int) -> str:
    """torch.profiler's operator table over 3 steps after 2 warm-up steps, by device time on a GPU."""
    for _ in range(2):
        step()
    with profiler_for(device) as profiler:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return operator_table(profiler, device, rows)


if __name__ == "__main__":
    main()
