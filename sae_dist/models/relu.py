"""The ReLU SAE baseline: f = ReLU(W_enc (x - b_pre) + b_enc), x_hat = f W_dec + b_pre, L1 on |f| * ||W_dec row||;
as a transcoder (docs/math.md section 9) b_in, b_out and the optional skip in place of b_pre."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_dist.config import SAEConfig
from sae_dist.flops import FlopsPerToken
from sae_dist.models.auxk import AuxCandidates
from sae_dist.models.base import SAE, Latents, SAEOutput, register, skip_flops_per_token, skip_input
from sae_dist.models.experts import decoder_rows, expert_generator
from sae_dist.models.losses import BatchReducer, fired_mask, l1_penalty, reconstruction_loss
from sae_dist.models.routing import TokenDispatcher


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
        generator = expert_generator(seed, 0)
        w_enc = torch.empty(cfg.num_latents, d_model).uniform_(-d_model**-0.5, d_model**-0.5, generator=generator)
        self.w_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.num_latents))
        self.w_dec = nn.Parameter(decoder_rows(w_enc, self.d_out, generator, self.transcoder))
        self._add_biases()

    @classmethod
    def default_lr(cls, cfg: SAEConfig, rule: str = "total") -> float:
        """The paper's ReLU baseline: 5e-5 (one width, so either rule)."""
        return 5e-5

    @classmethod
    def flops_per_token(cls, cfg: SAEConfig, d_model: int) -> FlopsPerToken:
        """Dense encoder, ReLU and dense decoder (d_out wide for a transcoder, and its skip GEMM); the backward
        twice each GEMM."""
        m, d = cfg.num_latents, d_model
        d_out = cfg.d_out or d
        skip_forward, skip_backward = skip_flops_per_token(cfg, d_model)
        return FlopsPerToken(encoder_paper=4 * m * d, forward=2 * m * d + m + 2 * m * d_out + skip_forward,
                             backward=2 * (2 * m * d + 2 * m * d_out) + skip_backward)

    @property
    def num_local_latents(self) -> int:
        return self.cfg.num_latents

    def saelens_state(self) -> tuple[str, dict, dict[str, Tensor]]:
        """SAELens's 'standard' SAE: ReLU((x - b_dec) W_enc + b_enc) W_dec + b_dec, the same math; a transcoder is
        its 'transcoder' ('skip_transcoder' with the skip)."""
        if self.transcoder:
            weights = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec}
            return self.saelens_transcoder("transcoder", weights)
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
        if self.transcoder:
            return {"b_in": self.b_in, "b_out": self.b_out}
        return {"b_pre": self.b_pre}

    def _fold_encoder_(self, scale: float, target_scale: float) -> None:
        """W_enc * s_x / s_y and b_enc / s_y: with b_in / s_x (`fold_input_scale_`), f = ReLU(W_enc (s_x / s_y)
        (x - b_in / s_x) + b_enc / s_y) is 1/s_y times the trained f."""
        self.w_enc.mul_(scale / target_scale)
        self.b_enc.div_(target_scale)

    def forward(self, x_TD: Tensor, aux_candidates: AuxCandidates | None = None) -> SAEOutput:
        """f = ReLU(W_enc (x - b_in) + b_enc) [T, M] dense, y_hat = f W_dec + b_out [+ W_skip x] (b_in = b_out =
        b_pre for an SAE); `aux_candidates` is unused (no AuxK)."""
        f_TM = F.relu(F.linear(x_TD - self.input_bias, self.w_enc, self.b_enc))
        return SAEOutput(self.reconstruct((f_TM @ self.w_dec).float(), x_TD), f_TM, None, None, None)

    def loss_terms(self, y_TO: Tensor, out: SAEOutput, reducer: BatchReducer | None = None) -> dict[str, Tensor]:
        return {"rec": reconstruction_loss(y_TO, out.x_hat_TD), "l1": l1_penalty(out.latent_values_RK, self.w_dec)}

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
    def decode(self, latents: Latents, x_TD: Tensor | None = None) -> Tensor:
        values_TK = latents.values_TK.to(self.w_dec.dtype)
        f_TM = values_TK.new_zeros(values_TK.shape[0], self.cfg.num_latents).scatter_(1, latents.indices_TK, values_TK)
        return self.reconstruct((f_TM @ self.w_dec).float(), skip_input(self, x_TD))
