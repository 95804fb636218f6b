"""A bank of TopK expert SAEs: encoder and decoder weights of the experts held on this device."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from sae_dist.models.kernels import grouped_topk_encode, sparse_decode


def seeded_generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one named stream of a run (stream 0: router; 1 + e: global expert e)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def expert_generator(seed: int, global_expert_id: int) -> torch.Generator:
    """Seeded by (seed, global expert id), never by rank, so every layout starts from the same weights."""
    return seeded_generator(seed, 1 + global_expert_id)


class ExpertOutput(NamedTuple):
    values_RK: Tensor
    """z: the k largest ReLU pre-activations per row (zeros where fewer are positive)."""
    indices_RK: Tensor
    """Flat local latent ids (local expert e, latent j -> e * M_e + j)."""
    recon_RD: Tensor
    """z W_dec: the decoded rows, before the router gate and b_pre."""
    aux_recon_RD: Tensor | None
    """The AuxK reconstruction from dead latents, or None when AuxK is off."""


class ExpertBank(nn.Module):
    """Experts `first_expert .. first_expert + num_local - 1`: W_enc, W_dec [N_local, M_e, d], b_enc [N_local, M_e]."""

    def __init__(
        self,
        num_local: int,
        latents_per_expert: int,
        d_model: int,
        encoder_bias: bool,
        seed: int,
        first_expert: int = 0,
    ):
        super().__init__()
        self.first_expert = first_expert
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
        self, rows_RD: Tensor, counts: list[int], k: int, dead_mask_L: Tensor | None = None, k_aux: int = 0
    ) -> ExpertOutput:
        """Encode and decode rows grouped by local expert (`counts[e]` rows for local expert e)."""
        w_dec_LD = self.w_dec.flatten(0, 1)
        b_enc_L = None if self.b_enc is None else self.b_enc.flatten()
        values_RK, indices_RK, aux_values_RA, aux_indices_RA = grouped_topk_encode(
            rows_RD, self.w_enc.flatten(0, 1), b_enc_L, counts, k, dead_mask_L, k_aux
        )
        recon_RD = sparse_decode(values_RK, indices_RK, w_dec_LD)
        aux_recon_RD = sparse_decode(aux_values_RA, aux_indices_RA, w_dec_LD) if k_aux else None
        return ExpertOutput(values_RK, indices_RK, recon_RD, aux_recon_RD)
