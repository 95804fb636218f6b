"""A bank of TopK expert SAEs: encoder and decoder weights of the experts held on this device."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from sae_dist.models.auxk import AuxCandidates
from sae_dist.models.dispatch import ExpertGroups
from sae_dist.models.formulation import Formulation, choose_formulation
from sae_dist.models.grouped import gemm_decode, gemm_encode
from sae_dist.models.kernels import SharedLatentOrder, sparse_decode, sparse_encode


def seeded_generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one named stream of a run (stream 0: router; 1 + e: global expert e)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def expert_generator(seed: int, global_expert_id: int) -> torch.Generator:
    """Seeded by (seed, global expert id), never by rank, so every layout starts from the same weights."""
    return seeded_generator(seed, 1 + global_expert_id)


class ExpertCodes(NamedTuple):
    """The encoder's selections for rows grouped by local expert (`ExpertBank.encode`)."""

    values_RK: Tensor
    """z: the k largest ReLU pre-activations per row (zeros where fewer are positive)."""
    indices_RK: Tensor
    """Flat local latent ids (local expert e, latent j -> e * M_e + j)."""
    aux_values_RA: Tensor | None
    """AuxK's selection among the dead candidates ([R, 0] when there are none), or None when AuxK does not run."""
    aux_indices_RA: Tensor | None
    """Its flat local latent ids, or None."""
    latent_order: SharedLatentOrder | None = None
    """The sparse formulation's sort of `indices_RK`, shared by the encoder's and the decoder's backward."""


class ExpertOutput(NamedTuple):
    values_RK: Tensor
    """The decoded codes z (`ExpertCodes.values_RK`, with any entries the caller zeroed)."""
    indices_RK: Tensor
    """Their flat local latent ids."""
    recon_RD: Tensor
    """z W_dec: the decoded rows, before the router gate and b_pre."""
    aux_recon_RD: Tensor | None
    """The AuxK reconstruction from dead latents, or None when AuxK does not run."""


class ExpertBank(nn.Module):
    """Experts `first_expert .. first_expert + num_local - 1`: W_enc, W_dec [N_local, M_e, d], b_enc [N_local, M_e].

    `encoder_backward` and `decoder` choose the formulation of the compute (`formulation.py`; 'auto' decides by
    device and expert width at each call).
    """

    def __init__(
        self,
        num_local: int,
        latents_per_expert: int,
        d_model: int,
        encoder_bias: bool,
        seed: int,
        first_expert: int = 0,
        encoder_backward: str = "auto",
        decoder: str = "auto",
    ):
        super().__init__()
        self.first_expert = first_expert
        self.encoder_backward, self.decoder = encoder_backward, decoder
        self.latents_per_expert = latents_per_expert
        w_enc = torch.empty(num_local, latents_per_expert, d_model)
        bound = d_model**-0.5  # PyTorch's default Linear init: U(-1/sqrt(d), 1/sqrt(d))
        for local in range(num_local):
            w_enc[local].uniform_(-bound, bound, generator=expert_generator(seed, first_expert + local))
        self.w_enc = nn.Parameter(w_enc)
        self.w_dec = nn.Parameter(w_enc / w_enc.norm(dim=-1, keepdim=True))
        self.b_enc = nn.Parameter(torch.zeros(num_local, latents_per_expert)) if encoder_bias else None

    @property
    def num_local(self) -> int:
        return self.w_enc.shape[0]

    def forward(
        self, rows_RD: Tensor, groups: ExpertGroups, k: int, aux: AuxCandidates | None = None, k_aux: int = 0
    ) -> ExpertOutput:
        """Encode and decode rows grouped by local expert; AuxK selects among `aux` candidates when given."""
        return self.decode(self.encode(rows_RD, groups, k, aux, k_aux), groups)

    def encode(
        self, rows_RD: Tensor, groups: ExpertGroups, k: int, aux: AuxCandidates | None = None, k_aux: int = 0
    ) -> ExpertCodes:
        """Each row's TopK_k inside its expert (and AuxK's selection among `aux` candidates when k_aux > 0)."""
        aux = aux if k_aux else None
        order = None
        if self._formulation(rows_RD).encoder_backward == "sparse":
            order = SharedLatentOrder()
            codes = sparse_encode(rows_RD, self.w_enc, self.b_enc, groups, k, aux, k_aux, order)
        else:
            codes = gemm_encode(rows_RD, self.w_enc, self.b_enc, groups, k, aux, k_aux)
        values_RK, ids_RK, aux_values_RA, aux_ids_RA = codes
        if aux is None:
            return ExpertCodes(values_RK, ids_RK, None, None, order)
        return ExpertCodes(values_RK, ids_RK, aux_values_RA, aux_ids_RA, order)

    def decode(self, codes: ExpertCodes, groups: ExpertGroups) -> ExpertOutput:
        """z W_dec per row for the codes (and the AuxK codes) of `encode`, possibly with some values zeroed."""
        gemm = self._formulation(codes.values_RK).decoder == "gemm"

        def decode(values: Tensor, ids: Tensor, order: SharedLatentOrder | None = None) -> Tensor:
            if gemm:
                return gemm_decode(values, ids, self.w_dec, groups)
            return sparse_decode(values, ids, self.w_dec, order)

        recon_RD = decode(codes.values_RK, codes.indices_RK, codes.latent_order)
        aux_recon_RD = None
        if codes.aux_indices_RA is not None:  # no candidate columns (nothing dead here): a zero reconstruction
            aux_ids_RA = codes.aux_indices_RA
            aux_recon_RD = decode(codes.aux_values_RA, aux_ids_RA) if aux_ids_RA.shape[1] else torch.zeros_like(recon_RD)
        return ExpertOutput(codes.values_RK, codes.indices_RK, recon_RD, aux_recon_RD)

    def _formulation(self, rows: Tensor) -> Formulation:
        """`sae.encoder_backward` and `sae.decoder` with 'auto' resolved for these rows' device."""
        return choose_formulation(self.encoder_backward, self.decoder, rows.device, self.latents_per_expert)
