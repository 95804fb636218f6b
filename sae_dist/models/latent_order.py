"""The latent-major order of a step's selected latent ids: the CSR pattern that the sparse backward's scatters and
sampled GEMM read, sorted once per step and shared by the decoder's and the encoder's backward."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LatentMajor(NamedTuple):
    """[R, S] latent ids in latent-major order (a stable sort of the flattened ids): the CSR pattern of the [L, R]
    matrix with a nonzero where row r selects latent l."""

    crow_L: Tensor
    """CSR row pointers over the L latents, int32 [L + 1]."""
    rows_N: Tensor
    """The row r of each selection in that order, int32 [R * S] (the CSR column indices)."""
    order_N: Tensor
    """Its position in the flattened ids, long [R * S]."""
    shape: tuple[int, int]
    """(L, R)."""


def latent_major(indices_RS: Tensor, num_latents: int) -> LatentMajor:
    """The latent-major order of `indices_RS` (ids in [0, num_latents)); int32 indices (below 2^31 selections):
    the sort reads and moves half the bytes of int64's."""
    rows, per_row = indices_RS.shape
    sorted_ids, order = torch.sort(indices_RS.flatten().int(), stable=True)
    latents = torch.arange(num_latents + 1, device=sorted_ids.device, dtype=torch.int32)
    crow = torch.searchsorted(sorted_ids, latents, out_int32=True)
    return LatentMajor(crow, (order // per_row).int(), order, (num_latents, rows))


class SharedLatentOrder:
    """One id tensor's `latent_major` order, sorted by the first backward that needs it and reused by the next:
    the decoder's backward, then the encoder's, over the same codes."""

    def __init__(self) -> None:
        self._layout: LatentMajor | None = None

    def of(self, indices_RS: Tensor, num_latents: int) -> LatentMajor:
        if self._layout is None or self._layout.order_N.numel() != indices_RS.numel():
            self._layout = latent_major(indices_RS, num_latents)
        return self._layout
