"""The optimizer update alone against its memory-bandwidth floor.

One update of a [M, d] decoder (unit-norm rows: gradient projection, Adam, renormalisation) and a [M, d] encoder
(Adam), the clip acting, on each backend of the optimizer (`sae_dist/train/optim.py`, `sae_dist/train/triton_adam.py`):
torch's fused Adam alone (what the update would cost without the decoder's constraint), the torch backend (`TorchAdam`:
torch's fused Adam, or its bf16-moment update, between the projection and renormalisation passes), and on a GPU the
Triton backend (`TritonAdam`), which does all of it in one pass over each weight.

Bytes: what the implementation's passes read and write at the least (Adam 28 bytes per element with float32
moments, 20 with bfloat16; the projection 12 and the renormalisation 8 per decoder element). Floor: one pass of the
update (28 or 20 bytes per element) at the device-to-device copy bandwidth measured in the same run.

    python benchmarks/bench_optimizer.py --device cuda        # M = 2^20, d = 768
    python benchmarks/bench_optimizer.py                      # CPU: M = 2^16, torch's float32 Adam only
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
from collections.abc import Callable

import torch
from bench_step import Clock, machine
from rich.console import Console
from rich.table import Table

from sae_dist.train.optim import TritonAdam, clipped_adam_step
from sae_dist.train.optim import TorchAdam

ADAM_BYTES = {"float32": 28, "bfloat16": 20}
"""Bytes per element of one Adam pass: parameter and both moments read and written, the gradient read."""
PROJECTION_BYTES, RENORM_BYTES = 12, 8
"""Per decoder element: rows and gradients read, gradients written; rows read and written."""


def copy_bandwidth(device: torch.device, clock: Clock) -> float:
    """Bytes per second of a device-to-device copy (read plus written), the best of 5."""
    src = torch.randn(2**28 if device.type == "cuda" else 2**25, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = min(clock(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.numel() * src.element_size() / seconds


def build_update(kind: str, state: str, latents: int, d: int, device: torch.device) -> Callable[[], None]:
    """One optimizer update of fresh weights as `kind` ('fused': no unit rows, 'separate': the torch backend,
    'triton') runs it; the weights' gradient norm is twice the max norm, so the clip acts."""
    g = torch.Generator(device).manual_seed(0)
    decoder = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(latents, d, device=device, generator=g),
                                                               dim=-1))
    encoder = torch.nn.Parameter(torch.randn(latents, d, device=device, generator=g))
    for w in (decoder, encoder):
        w.grad = torch.randn(latents, d, device=device, generator=g)
    params, hyper = [decoder, encoder], {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8}
    unit_rows = [] if kind == "fused" else [decoder]
    adam = TritonAdam if kind == "triton" else TorchAdam
    optimizer = adam(params, **hyper, state_dtype=getattr(torch, state), unit_norm_rows=unit_rows)
    grad_norm, apply = torch.tensor(2.0, device=device), torch.tensor(True, device=device)
    return lambda: clipped_adam_step(optimizer, grad_norm, 1.0, apply)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--latents", type=int, help="M (default: 2^20 on CUDA, 2^16 on CPU)")
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=10, help="timed updates per implementation")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here; use --device cpu", file=sys.stderr)
        sys.exit(2)
    if args.latents is not None and args.latents < 1 or args.d < 1 or args.repeats < 1:
        print(f"--latents {args.latents}, --d {args.d}, --repeats {args.repeats}: each must be at least 1",
              file=sys.stderr)
        sys.exit(2)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    latents = args.latents or (2**20 if cuda else 2**16)
    clock = Clock(device)
    bandwidth = copy_bandwidth(device, clock)
    elements = 2 * latents * args.d
    rows = [("torch fused Adam, no decoder passes", "fused", "float32"),
            ("torch fused Adam + projection + renormalisation", "separate", "float32")]
    if cuda:  # bf16 moments on a CPU are eager chunks, slower than float32 Adam (it saves memory there)
        rows += [("torch Adam, bf16 moments + projection + renormalisation", "separate", "bfloat16"),
                 ("TritonAdam (projection, renormalisation inside)", "triton", "float32"),
                 ("TritonAdam (projection, renormalisation inside)", "triton", "bfloat16")]
    title = (f"One optimizer update of a [{latents}, {args.d}] decoder and encoder; {machine(device)}; "
             f"torch {torch.__version__}; {datetime.date.today()}; copy bandwidth {bandwidth / 1e9:,.0f} GB/s; "
             f"load {os.getloadavg()[0]:.1f} at start")
    table = Table(title=title)
    for column in ("implementation", "moments", "ms/update", "GB moved", "GB/s", "floor ms", "x floor"):
        table.add_column(column, justify="left" if column in ("implementation", "moments") else "right")
    for label, kind, state in rows:
        update = build_update(kind, state, latents, args.d, device)
        for _ in range(2):  # compiles
            update()
        seconds = statistics.median(clock(update) for _ in range(args.repeats))
        del update
        gc.collect()
        moved = elements * ADAM_BYTES[state] + (elements // 2 * (PROJECTION_BYTES + RENORM_BYTES)
                                                if kind == "separate" else 0)
        floor = elements * ADAM_BYTES[state] / bandwidth
        table.add_row(label, state, f"{seconds * 1e3:.2f}", f"{moved / 1e9:.1f}", f"{moved / seconds / 1e9:,.0f}",
                      f"{floor * 1e3:.2f}", f"{seconds / floor:.2f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
