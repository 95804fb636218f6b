"""BatchTopK experts (Bussmann et al. 2024) behind a Switch router: `sae.kind=batchtopk`.

Training: expert e keeps the n_e * k largest ReLU pre-activations over all n_e rows routed to it in the batch (its
own tokens only), so a token may use more or fewer than k latents while the expert averages k per token. Inference
(eval mode): a latent is active where its pre-activation exceeds the expert's threshold theta_e, an exponential
moving average (decay `THRESHOLD_DECAY`) of the smallest activation each training batch kept; replicas of an expert
average their batch minima before the update, so every replica holds the same theta.

Under expert parallelism with one replica per expert (P = W), an expert receives all its tokens of the global
batch, so the selection equals the single-device one; with W / P > 1 replicas each selects over its own share.
The compute is grouped GEMMs both ways (`gemm_compute.py`) over dense [rows, M_e] codes, whatever
sae.encoder_backward_kernel and sae.decoder_kernel say: the selection needs every activation of an expert's rows.

SAELens export (the eval-mode SAE): each expert is a JumpReLU SAE with threshold theta_e on every latent (what
SAELens saves its own BatchTopK SAEs as), so N = 1 is SAELens's built-in 'jumprelu' and N > 1 the 'sae_dist_switch'
architecture with `activation` 'threshold' (or, per expert, N 'jumprelu' SAEs); a transcoder's are their transcoder
forms ('jumprelu_transcoder', 'sae_dist_switch_transcoder').
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_dist.config import ConfigError, SAEConfig
from sae_dist.models.auxk import AuxCandidates
from sae_dist.models.base import SAEOutput, register
from sae_dist.models.expert_sae import ExpertSAE
from sae_dist.models.experts import ExpertBank, ExpertOutput
from sae_dist.models.gemm_compute import expert_linear, grouped_matmul
from sae_dist.models.losses import BatchReducer
from sae_dist.models.routing import ExpertGroups
from sae_dist.models.switch import switch_saelens_state

THRESHOLD_DECAY = 0.99
"""Weight of the running threshold in each update (as in the reference implementations' EMA)."""


def batch_topk_mask(acts_RM: Tensor, counts: list[int], k: int) -> Tensor:
    """Bool [R, M_e]: per expert (rows grouped, `counts` rows each) its rows' count * k largest activations."""
    keep_RM = torch.zeros_like(acts_RM, dtype=torch.bool)
    start = 0
    for count in counts:
        if count:
            block_N = acts_RM[start : start + count].flatten()
            picks = block_N.topk(min(count * k, block_N.numel()), sorted=False).indices
            keep_RM[start : start + count].view(-1)[picks] = True
        start += count
    return keep_RM


class BatchTopKBank(ExpertBank):
    """An `ExpertBank` selecting per expert over its batch in training and by `threshold_N` [N_local] in eval; its
    `forward` runs grouped GEMMs itself, not the bank's chosen compute."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("threshold_N", torch.zeros(self.num_local))

    def forward(
        self, rows_RD: Tensor, groups: ExpertGroups, k: int, aux: AuxCandidates | None = None, k_aux: int = 0
    ) -> ExpertOutput:
        """Dense codes: values [R, M_e] (zeros where inactive) and their flat ids; no AuxK."""
        pre_RM = expert_linear(rows_RD, self.w_enc, groups, self.b_enc)
        acts_RM = F.relu(pre_RM)
        if self.training:
            keep_RM = batch_topk_mask(acts_RM.detach(), groups.host_counts(), k)
        else:
            keep_RM = acts_RM > self.threshold_N.to(acts_RM.dtype)[groups.expert_R, None]
        codes_RM = acts_RM * keep_RM
        width = self.latents_per_expert
        ids_RM = torch.arange(width, device=rows_RD.device) + groups.expert_R[:, None] * width
        return ExpertOutput(codes_RM, ids_RM, grouped_matmul(codes_RM, self.w_dec, groups), None)


@register("batchtopk")
class BatchTopKSAE(ExpertSAE):
    """Router + N BatchTopK experts (N = 1: a dense BatchTopK SAE with a trivial router)."""

    label = "BatchTopK"
    routed = True
    rows_independent = False
    resamples_latents = False  # its thresholds would need resetting too; not supported
    bank_class = BatchTopKBank

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        if cfg.union_topk:
            raise ConfigError("sae.union_topk=true: sae.kind='batchtopk' selects per expert over its batch; use false")
        super().check_config(cfg)
        if cfg.auxk_alpha:
            raise ConfigError(f"sae.auxk_alpha={cfg.auxk_alpha}: sae.kind='batchtopk' has no AuxK; use null or 0")
        if cfg.experts_per_token != 1:
            raise ConfigError(f"sae.experts_per_token={cfg.experts_per_token}: sae.kind='batchtopk' routes each token "
                              "to one expert; use 1")

    def saelens_expert_states(self) -> list[tuple[str, dict, dict[str, Tensor]]]:
        """SAELens's 'jumprelu' SAEs, threshold theta_e on each of expert e's latents: ReLU(pre) where
        pre > theta_e, pre = (x - b_dec) W_enc + b_enc, as this bank's eval mode (theta >= 0); for a transcoder
        SAELens's 'jumprelu_transcoder' (`saelens_transcoder`)."""
        states = []
        for e in range(self.num_local_experts):
            weights = self.expert_weights(e)
            weights["threshold"] = self.experts.threshold_N[e].expand(self.latents_per_expert)
            if self.transcoder:
                del weights["b_dec"]
                states.append(self.saelens_transcoder("jumprelu_transcoder", weights))
            else:
                states.append(("jumprelu", {}, weights))
        return states

    def saelens_state(self) -> tuple[str, dict, dict[str, Tensor]]:
        """N = 1: SAELens's 'jumprelu' (the router's one expert has p = 1); N > 1: 'sae_dist_switch' (a
        transcoder: 'sae_dist_switch_transcoder') selecting the chosen expert's latents above its threshold (weight
        `threshold` [N])."""
        if self.cfg.num_experts == 1:
            return self.saelens_expert_states()[0]
        architecture, entries, weights = switch_saelens_state(self)
        return architecture, {**entries, "activation": "threshold"}, {**weights, "threshold": self.experts.threshold_N}

    def _fold_encoder_(self, scale: float, target_scale: float) -> None:
        """As the experts' (`ExpertSAE._fold_encoder_`), and each threshold theta_e / s_y: it compares
        pre-activations, which become 1/s_y times the trained ones."""
        super()._fold_encoder_(scale, target_scale)
        self.experts.threshold_N.div_(target_scale)

    @torch.no_grad()
    def after_step(self, out: SAEOutput, reducer: BatchReducer | None, applied: Tensor) -> None:
        """theta_e <- decay * theta_e + (1 - decay) * (the replicas' mean of the smallest activation kept by
        expert e in this batch); an expert no replica's batch reached keeps its theta; the first update sets it."""
        bank = self.experts
        values_RM = out.latent_values_RK.float()
        expert_R = out.latent_indices_RK[:, 0] // self.latents_per_expert
        kept_min_R = values_RM.masked_fill(values_RM <= 0, float("inf")).amin(dim=1)
        min_N = torch.full((bank.num_local,), float("inf"), device=values_RM.device)
        min_N = min_N.scatter_reduce(0, expert_R, kept_min_R, reduce="amin")
        seen_N = torch.isfinite(min_N)
        sums = torch.stack([torch.where(seen_N, min_N, 0.0), seen_N.float()])
        if reducer is not None:
            sums = reducer.sum_over_expert_replicas(sums)
        batch_N = sums[0] / sums[1].clamp_min(1)
        theta_N = bank.threshold_N
        blended_N = THRESHOLD_DECAY * theta_N + (1 - THRESHOLD_DECAY) * batch_N
        new_N = torch.where(theta_N > 0, blended_N, batch_N)  # 0: never set
        theta_N.copy_(torch.where((sums[1] > 0) & applied, new_N, theta_N))
