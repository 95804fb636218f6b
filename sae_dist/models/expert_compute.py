"""The expert compute: how a bank of TopK experts turns rows grouped by expert into codes and reconstructions.

`ExpertCompute` has two implementations of the same math: the sparse formulation (`sparse_compute.py`), whose
backward and decoder touch only the k selected latents of each row, and the grouped-GEMM formulation
(`gemm_compute.py`), dense GEMMs over each expert's own rows. A bank holds one for its encoder and one for its
decoder, picked when it is built (`formulation.py`); both give the same forward and gradients to float tolerance
(tests/models). An implementation owns whatever it reuses from call to call (workspaces, gradient buffers); what
one call hands to the next (the sort of the selected ids, `SharedLatentOrder`) travels in `ExpertCodes`.

Latent ids are "flat": local expert e's latent j is e * M_e + j, indexing the [N * M_e, d] flattened weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from sae_dist.models.auxk import AuxCandidates
    from sae_dist.models.routing import ExpertGroups


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype a matmul on `t` runs in: autocast's where it is on (it does not cover grouped_mm), else t's."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


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


class ExpertCodes(NamedTuple):
    """The encoder's selections for rows grouped by local expert (`ExpertCompute.encode`)."""

    values_RK: Tensor
    """z: the k largest ReLU pre-activations per row (zeros where fewer are positive)."""
    indices_RK: Tensor
    """Flat local latent ids (local expert e, latent j -> e * M_e + j)."""
    aux_values_RA: Tensor | None
    """AuxK's selection among the dead candidates ([R, 0] when there are none), or None when AuxK does not run."""
    aux_indices_RA: Tensor | None
    """Its flat local latent ids, or None."""
    latent_order: SharedLatentOrder | None = None
    """The sparse encoder's sort of `indices_RK`, shared by its backward and the sparse decoder's (None from the
    GEMM encoder)."""


class ExpertCompute(ABC):
    """Encoder and decoder of TopK experts over rows grouped by local expert (`ExpertGroups`)."""

    @abstractmethod
    def encode(
        self,
        rows_RD: Tensor,
        w_enc_NMD: Tensor,
        b_enc_NM: Tensor | None,
        groups: ExpertGroups,
        k: int,
        aux: AuxCandidates | None,
        k_aux: int,
    ) -> ExpertCodes:
        """z = TopK_k(ReLU(W_enc^e x + b_enc^e)) per row x (already centred, x - b_pre) of expert e, and AuxK's
        top `k_aux` among the `aux` candidates (aux fields None when `aux` is None).

        rows_RD [R, d]; w_enc_NMD [N_local, M_e, d]; b_enc_NM [N_local, M_e] or None."""

    @abstractmethod
    def decode(
        self,
        values_RK: Tensor,
        ids_RK: Tensor,
        w_dec_NMD: Tensor,
        groups: ExpertGroups,
        latent_order: SharedLatentOrder | None = None,
    ) -> Tensor:
        """sum_j values[r, j] * W_dec[ids[r, j]] -> [R, d] (flat ids into the [N_local * M_e, d] flattened
        decoder); `latent_order`: the `ExpertCodes.latent_order` of these ids, if they are an encoder's."""

    def in_place_weight_grads(self, enabled: bool) -> AbstractContextManager[None]:
        """A block whose graphs write the weight gradients into the parameters' `.grad` directly (where this
        formulation can); outside one, they flow through autograd."""
        return nullcontext()
