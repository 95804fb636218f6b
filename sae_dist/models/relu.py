"""The ReLU SAE baseline: f = ReLU(W_enc (x - b_pre) + b_enc), x_hat = f W_dec + b_pre, L1 on |f| * ||W_dec row||."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_dist.config import SAEConfig
from sae_dist.flops import FlopsPerToken
from sae_dist.models.auxk import AuxCandidates
from sae_dist.models.base import SAE, Latents, SAEOutput, register
from sae_dist.models.dispatch import TokenDispatcher
from sae_dist.models.experts import expert_generator
from sae_dist.models.losses import BatchReducer, fired_mask, l1_penalty, reconstruction_loss


@register("relu")
class ReLUSAE(SAE):
    """Dense ReLU SAE of width M; initialised like one TopK expert (encoder rows U(-1/sqrt(d), 1/sqrt(d))).

    No AuxK: its dead latents are not revived by an auxiliary loss. `dispatcher` is unused (no experts).
    """

    label = "ReLU"
    uses_k = False
    folds_input_scale = True

    def __init__(self, cfg: SAEConfig, d_model: int, seed: int, dispatcher: TokenDispatcher | None = None):
        super().__init__(cfg, d_model)
        bound = d_model**-0.5
        w_enc = torch.empty(cfg.num_latents, d_model).uniform_(-bound, bound, generator=expert_generator(seed, 0))
        self.w_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.num_latents))
        self.w_dec = nn.Parameter(w_enc / w_enc.norm(dim=-1, keepdim=True))
        self.b_pre = nn.Parameter(torch.zeros(d_model))

    @classmethod
    def default_lr(cls, cfg: SAEConfig, rule: str = "total") -> float:
        """The paper's ReLU baseline: 5e-5 (one width, so either rule)."""
        return 5e-5

    @classmethod
    def flops_per_token(cls, cfg: SAEConfig, d_model: int) -> FlopsPerToken:
        """Dense encoder, ReLU and dense decoder; the backward twice each GEMM."""
        m, d = cfg.num_latents, d_model
        return FlopsPerToken(encoder_paper=4 * m * d, forward=2 * m * d + m + 2 * m * d, backward=2 * (4 * m * d))

    @property
    def num_local_latents(self) -> int:
        return self.cfg.num_latents

    def saelens_state(self) -> tuple[str, dict, dict[str, Tensor]]:
        """SAELens's 'standard' SAE: ReLU((x - b_dec) W_enc + b_enc) W_dec + b_dec, the same math."""
        return "standard", {}, {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}

    @property
    def W_enc(self) -> Tensor:  # noqa: N802
        return self.w_enc.T

    @property
    def W_dec(self) -> Tensor:  # noqa: N802
        return self.w_dec

    def decoder_weights(self) -> list[nn.Parameter]:
        return [self.w_dec]

    def bias_parameters(self) -> dict[str, nn.Parameter]:
        return {"b_pre": self.b_pre}

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """b_pre and b_enc / s: f = ReLU(W_enc (x - b_pre / s) + b_enc / s) is 1/s times the trained f."""
        self.b_pre.div_(scale)
        self.b_enc.div_(scale)

    def forward(self, x_TD: Tensor, aux_candidates: AuxCandidates | None = None) -> SAEOutput:
        """f = ReLU(W_enc (x - b_pre) + b_enc) [T, M] dense; `aux_candidates` is unused (no AuxK)."""
        f_TM = F.relu(F.linear(x_TD - self.b_pre, self.w_enc, self.b_enc))
        x_hat_TD = (f_TM @ self.w_dec).float() + self.b_pre.float()
        return SAEOutput(x_hat_TD, f_TM, None, None, None)

    def loss_terms(self, x_TD: Tensor, out: SAEOutput, reducer: BatchReducer | None = None) -> dict[str, Tensor]:
        return {"rec": reconstruction_loss(x_TD, out.x_hat_TD), "l1": l1_penalty(out.latent_values_RK, self.w_dec)}

    def loss_weights(self, step_fraction: float) -> dict[str, float]:
        """The L1 coefficient ramps linearly from 0 over the first `l1_warmup_frac` of training."""
        warmup = self.cfg.l1_warmup_frac
        ramp = 1.0 if warmup == 0 else min(1.0, step_fraction / warmup)
        return {"l1": self.cfg.l1_coefficient * ramp}

    def fired_latents(self, out: SAEOutput) -> Tensor:
        return fired_mask(out.latent_values_RK, None, self.num_local_latents)

    @torch.no_grad()
    def encode(self, x_TD: Tensor) -> Latents:
        """All M activations per token, as (values [T, M], ids [T, M])."""
        f_TM = self(x_TD).latent_values_RK
        ids_TM = torch.arange(f_TM.shape[1], device=f_TM.device).expand_as(f_TM)
        return Latents(f_TM, ids_TM)

    @torch.no_grad()
    def decode(self, latents: Latents) -> Tensor:
        f_TM = torch.zeros(latents.values_TK.shape[0], self.cfg.num_latents, device=latents.values_TK.device)
        f_TM.scatter_(1, latents.indices_TK, latents.values_TK.float())
        return (f_TM @ self.w_dec).float() + self.b_pre.float()
