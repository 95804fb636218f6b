"""Collectives with byte accounting, and the differentiable all-to-all that moves token rows between ranks.

Every collective the expert-parallel code issues goes through here, so `CommStats` sees all traffic: the
benchmark reads it to compare the bytes moved per step with the minimum.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

# Elements per flattened all-reduce: bounds the temporary copy while keeping the number of calls small.
BUCKET_NUMEL = 1 << 24


class CommStats:
    """Bytes this rank handed to collectives, by kind.

    'a2a' / 'a2a_backward': token rows of the forward / backward all-to-alls (with '_remote': the part sent to
    other ranks), 'a2a_counts': the per-expert counts, 'all_reduce', 'all_gather'.
    """

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] += nbytes

    def reset(self) -> None:
        self.bytes.clear()


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def all_to_all_rows(
    x_RD: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup, stats: CommStats, kind: str
) -> Tensor:
    """Send rows in_splits[j] to rank j of `group`, receive out_splits[j] rows from rank j; any trailing shape."""
    x_RD = x_RD.contiguous()
    out_RD = x_RD.new_empty((sum(out_splits), *x_RD.shape[1:]))
    dist.all_to_all_single(out_RD, x_RD, out_splits, in_splits, group=group)
    row_bytes = nbytes(x_RD[:1]) if x_RD.shape[0] else 0
    stats.add(kind, nbytes(x_RD))
    stats.add(kind + "_remote", (sum(in_splits) - in_splits[dist.get_rank(group)]) * row_bytes)
    return out_RD


class AllToAllRows(torch.autograd.Function):
    """all_to_all_rows whose backward is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x_RD, out_splits, in_splits, group, stats):
        ctx.splits, ctx.group, ctx.stats = (out_splits, in_splits), group, stats
        return all_to_all_rows(x_RD, out_splits, in_splits, group, stats, "a2a")

    @staticmethod
    def backward(ctx, grad_RD):
        out_splits, in_splits = ctx.splits
        grad_x = all_to_all_rows(grad_RD, in_splits, out_splits, ctx.group, ctx.stats, "a2a_backward")
        return grad_x, None, None, None, None


def all_reduce_flat_(tensors: list[Tensor], group: ProcessGroup, stats: CommStats, scale: float = 1.0) -> None:
    """Sum `tensors` in place over `group` in flattened buckets (few large calls), then multiply by `scale`."""
    buckets: list[list[Tensor]] = [[]]
    for t in tensors:
        if buckets[-1] and sum(b.numel() for b in buckets[-1]) + t.numel() > BUCKET_NUMEL:
            buckets.append([])
        buckets[-1].append(t)
    for bucket in buckets:
        if not bucket:
            continue
        flat = torch.cat([t.flatten() for t in bucket])
        dist.all_reduce(flat, group=group)
        stats.add("all_reduce", nbytes(flat))
        flat.mul_(scale)
        for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
            t.copy_(part.view_as(t))
