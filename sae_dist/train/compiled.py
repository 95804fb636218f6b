"""The step's memory-bound passes as single kernels on a GPU: `torch.compile` there, eager PyTorch elsewhere.

A row renormalisation in eager PyTorch reads the weights twice (norms, then scaling) and writes them once; compiled
it is one kernel that reads and writes each row once. At M = 2^20 latents the decoder alone is 3.2 GB, so every
pass saved is about a millisecond of an H100's step. On a CPU the eager passes are measured fast enough
(README, Benchmarks), and compiling would cost a C++ toolchain and a minute at start-up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor


@functools.cache
def _compiled(fn: Callable) -> Callable:
    # dynamic: one kernel serves every tensor size; fullgraph: fail loudly rather than fall back to eager pieces.
    return torch.compile(fn, dynamic=True, fullgraph=True)


def on_device(fn: Callable, *args: Tensor | float | bool) -> None:
    """Run `fn(*args)`, compiled into one kernel when its first argument lives on a GPU."""
    (_compiled(fn) if args[0].is_cuda else fn)(*args)
