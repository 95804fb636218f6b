"""A bank of TopK expert SAEs: encoder and decoder weights of the experts held on this device, and the expert
compute that runs them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

from sae_dist.models.auxk import AuxCandidates
from sae_dist.models.expert_compute import ExpertCodes
from sae_dist.models.formulation import choose_compute
from sae_dist.models.routing import ExpertGroups


def seeded_generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one named stream of a run (stream 0: router; 1 + e: global expert e)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def expert_generator(seed: int, global_expert_id: int) -> torch.Generator:
    """Seeded by (seed, global expert id), never by rank, so every layout starts from the same weights."""
    return seeded_generator(seed, 1 + global_expert_id)


def decoder_rows(w_enc_MD: Tensor, d_out: int, generator: torch.Generator | None, independent: bool) -> Tensor:
    """Unit-norm decoder rows [..., M, d_out]: the encoder rows normalised (an SAE), or, `independent` (a
    transcoder, whose decoder writes another space), rows drawn U(-1/sqrt(d_out), 1/sqrt(d_out)) from `generator`
    after the encoder's and normalised (docs/math.md section 9)."""
    if not independent:
        return w_enc_MD / w_enc_MD.norm(dim=-1, keepdim=True)
    bound = d_out**-0.5
    w_dec_MO = torch.empty(*w_enc_MD.shape[:-1], d_out).uniform_(-bound, bound, generator=generator)
    return w_dec_MO / w_dec_MO.norm(dim=-1, keepdim=True)


class ExpertOutput(NamedTuple):
    values_RK: Tensor
    """The decoded codes z (`ExpertCodes.values_RK`, with any entries the caller zeroed); K = M_e for the dense
    codes of BatchTopK experts."""
    indices_RK: Tensor
    """Their flat local latent ids."""
    recon_RD: Tensor
    """z W_dec: the decoded rows, before the router gate and b_pre."""
    aux_recon_RD: Tensor | None
    """The AuxK reconstruction from dead latents, or None when AuxK does not run."""


class ExpertBank(nn.Module):
    """Experts `first_expert .. first_expert + num_local - 1`: W_enc [N_local, M_e, d], W_dec [N_local, M_e, d_out]
    (d_out = d but for a transcoder's bank), b_enc [N_local, M_e].

    `encoder_backward` and `decoder` (`sae.encoder_backward_kernel`, `sae.decoder_kernel`) choose the expert compute
    of the encoder and of the decoder once, for the device the weights are on (`formulation.py`): at construction,
    and again when the bank moves to another device (`.to`, `.cuda`), 'auto' deciding by that device.
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
        d_out: int | None = None,
    ):
        super().__init__()
        self.first_expert = first_expert
        self.encoder_backward, self.decoder = encoder_backward, decoder
        self.latents_per_expert = latents_per_expert
        w_enc = torch.empty(num_local, latents_per_expert, d_model)
        w_dec = None if d_out is None else torch.empty(num_local, latents_per_expert, d_out)
        bound = d_model**-0.5  # PyTorch's default Linear init: U(-1/sqrt(d), 1/sqrt(d))
        for local in range(num_local):
            generator = expert_generator(seed, first_expert + local)
            w_enc[local].uniform_(-bound, bound, generator=generator)
            if w_dec is not None:
                w_dec[local] = decoder_rows(w_enc[local], d_out, generator, independent=True)
        self.w_enc = nn.Parameter(w_enc)
        self.w_dec = nn.Parameter(decoder_rows(w_enc, d_model, None, independent=False) if w_dec is None else w_dec)
        self.b_enc = nn.Parameter(torch.zeros(num_local, latents_per_expert)) if encoder_bias else None
        self._choose_compute()

    def _choose_compute(self) -> None:
        self.compute_device = self.w_enc.device
        """The device the compute was chosen for."""
        self.encoder_compute, self.decoder_compute = choose_compute(
            self.encoder_backward, self.decoder, self.compute_device, self.latents_per_expert
        )

    def _apply(self, fn, recurse: bool = True):
        """Every move of the weights (`.to`, `.cuda`, `.double`) passes here: a new device chooses the compute
        again, as the rule depends on it."""
        bank = super()._apply(fn, recurse)
        if self.w_enc.device != self.compute_device:
            self._choose_compute()
        return bank

    @property
    def num_local(self) -> int:
        return self.w_enc.shape[0]

    @contextmanager
    def in_place_weight_grads(self, enabled: bool) -> Iterator[None]:
        """Graphs built inside write W_enc's and W_dec's gradients into `.grad` where their compute can (see
        `sparse_compute.py`)."""
        with ExitStack() as stack:
            unique = {id(c): c for c in (self.encoder_compute, self.decoder_compute)}  # one when the halves share
            for compute in unique.values():
                stack.enter_context(compute.in_place_weight_grads(enabled))
            yield

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
        return self.encoder_compute.encode(rows_RD, self.w_enc, self.b_enc, groups, k, aux, k_aux)

    def decode(self, codes: ExpertCodes, groups: ExpertGroups) -> ExpertOutput:
        """z W_dec per row for the codes (and the AuxK codes) of `encode`, possibly with some values zeroed."""
        compute = self.decoder_compute
        recon_RD = compute.decode(codes.values_RK, codes.indices_RK, self.w_dec, groups, codes.latent_order)
        aux_recon_RD = None
        if codes.aux_indices_RA is not None:  # no candidate columns (nothing dead here): a zero reconstruction
            aux_ids_RA = codes.aux_indices_RA
            aux_recon_RD = (compute.decode(codes.aux_values_RA, aux_ids_RA, self.w_dec, groups)
                            if aux_ids_RA.shape[1] else torch.zeros_like(recon_RD))
        return ExpertOutput(codes.values_RK, codes.indices_RK, recon_RD, aux_recon_RD)
