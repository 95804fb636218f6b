"""The expert compute: how a bank of TopK experts turns rows grouped by expert into codes and reconstructions.

`ExpertCompute` has two implementations of the same math: the sparse formulation (`sparse_compute.py`), whose
backward and decoder touch only the k selected latents of each row, and the grouped-GEMM formulation
(`gemm_compute.py`), dense GEMMs over each expert's own rows. A bank holds one for its encoder and one for its
decoder, picked when it is built (`formulation.py`); both give the same forward and gradients to float tolerance
(tests/models). An implementation owns whatever it reuses from call to call (workspaces, gradient buffers); what
one call hands to the next (the sort of the selected ids) travels in `ExpertCodes`.

Latent ids are "flat": local expert e's latent j is e * M_e + j, indexing the [N * M_e, d] flattened weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, NamedTuple

from torch import Tensor

if TYPE_CHECKING:
    from sae_dist.models.auxk import AuxCandidates
    from sae_dist.models.dispatch import ExpertGroups
    from sae_dist.models.latent_order import SharedLatentOrder


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
