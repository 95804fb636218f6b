"""SAEs built on a bank of TopK experts: the Switch SAE (`switch.py`), the dense TopK SAE (`topk.py`) and
BatchTopK experts (`batchtopk.py`) share this forward, loss and encode/decode.

Forward, per token x:  with a router, p = softmax(W_router (x - b_router)) (float32), e* = argmax p (without one,
e* = 0 and p_{e*} = 1); z = TopK_k(ReLU(W_enc^{e*} (x - b_pre) [+ b_enc])); x_hat = p_{e*} * z W_dec^{e*} + b_pre.
Only the chosen expert's encoder runs on a token: the dispatcher groups tokens by expert first.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae_dist.config import SAEConfig
from sae_dist.models.auxk import AuxCandidates, dead_candidates
from sae_dist.models.base import SAE, Latents, SAEOutput
from sae_dist.models.dispatch import ExpertGroups, LocalDispatcher, TokenDispatcher
from sae_dist.models.experts import ExpertBank, seeded_generator
from sae_dist.models.kernels import sparse_decode
from sae_dist.models.losses import BatchReducer, auxk_loss, fired_mask, reconstruction_loss
from sae_dist.models.router import Router, load_balancing_loss


class BankedSAE(SAE):
    """b_pre, an optional router, and an `ExpertBank` of the experts this dispatcher holds here.

    Subclasses choose the router (`routed`), the encoder bias, the default AuxK weight and the bank class.
    """

    encoder_bias: bool = False
    default_auxk_alpha: float = 0.0
    bank_class: type[ExpertBank] = ExpertBank

    def __init__(self, cfg: SAEConfig, d_model: int, seed: int, dispatcher: TokenDispatcher | None = None):
        super().__init__(cfg, d_model)
        self.latents_per_expert = cfg.num_latents // cfg.num_experts
        self.dispatcher = dispatcher or LocalDispatcher(cfg.num_experts)
        self.b_pre = nn.Parameter(torch.zeros(d_model))
        self.router = Router(d_model, cfg.num_experts, seeded_generator(seed, 0)) if self.routed else None
        self.experts = self.bank_class(
            num_local=self.dispatcher.num_local_experts,
            latents_per_expert=self.latents_per_expert,
            d_model=d_model,
            encoder_bias=self.encoder_bias,
            seed=seed,
            first_expert=self.dispatcher.first_local_expert,
            encoder_backward=cfg.encoder_backward,
            decoder=cfg.decoder,
        )
        self.auxk_alpha = self.default_auxk_alpha if cfg.auxk_alpha is None else cfg.auxk_alpha
        self.k_aux = (cfg.auxk_k or d_model // 2) if self.auxk_alpha > 0 else 0

    @property
    def num_local_latents(self) -> int:
        return self.experts.num_local * self.latents_per_expert

    @property
    def num_local_experts(self) -> int:
        return self.experts.num_local

    def expert_sharded(self) -> frozenset[str]:
        """The bank: its dim 0 is the local expert (one expert, never split, for an SAE without a router)."""
        return frozenset(f"experts.{name}" for name in self.experts.state_dict())

    @property
    def W_enc(self) -> Tensor:  # noqa: N802
        return self.experts.w_enc.flatten(0, 1).T

    @property
    def W_dec(self) -> Tensor:  # noqa: N802
        return self.experts.w_dec.flatten(0, 1)

    def decoder_weights(self) -> list[nn.Parameter]:
        return [self.experts.w_dec]

    def bias_parameters(self) -> dict[str, nn.Parameter]:
        biases = {"b_pre": self.b_pre}
        if self.router is not None:
            biases["b_router"] = self.router.b_router
        return biases

    def forward(
        self, x_TD: Tensor, dead_mask_L: Tensor | None = None, aux_candidates: AuxCandidates | None = None
    ) -> SAEOutput:
        """AuxK (when on) selects among `aux_candidates`, or among the latents where `dead_mask_L` [L] is True."""
        routing = self.router(x_TD) if self.router is not None else None
        expert_T = routing.expert_T if routing is not None else x_TD.new_zeros(x_TD.shape[0], dtype=torch.long)
        scores_T = routing.gate_T.detach() if routing is not None else None
        if aux_candidates is None and dead_mask_L is not None and self.k_aux:
            aux_candidates = dead_candidates(dead_mask_L, self.experts.num_local)
        k_aux = self.k_aux if aux_candidates is not None else 0

        def run_experts(rows_RD: Tensor, groups: ExpertGroups) -> tuple[Tensor, tuple]:
            out = self.experts(rows_RD, groups, self.cfg.k, aux_candidates, k_aux)
            # One combine for both reconstructions: one all-to-all under expert parallelism.
            recon_R = out.recon_RD if out.aux_recon_RD is None else torch.cat([out.recon_RD, out.aux_recon_RD], 1)
            return recon_R, (out.values_RK, out.indices_RK)

        run = self.dispatcher.run(x_TD - self.b_pre, expert_T, scores_T, run_experts)
        values_RK, indices_RK = run.per_row
        recon_T = run.combined_T.float()
        decoded_TD, aux_TD = recon_T[:, : self.d_model], recon_T[:, self.d_model :]
        gate_T1 = routing.gate_T[:, None] if routing is not None else 1.0
        # A token dropped by a capacity limit combines to a zero row, so its x_hat is b_pre.
        x_hat_TD = gate_T1 * decoded_TD + self.b_pre.float()
        aux_recon_TD = None
        if k_aux:
            aux_recon_TD = aux_TD * (gate_T1.detach() if routing is not None else 1.0)
        return SAEOutput(x_hat_TD, values_RK, indices_RK, routing, aux_recon_TD, run.plan.kept_T, run.plan)

    def loss_terms(self, x_TD: Tensor, out: SAEOutput, reducer: BatchReducer | None = None) -> dict[str, Tensor]:
        """Unweighted loss terms: 'rec', and 'lb' (Switch) and 'auxk' (when on).

        `reducer` (the parallel context) makes the batch statistics global: the load-balancing counts and the
        AuxK variance. Each rank's terms are then shares whose mean over ranks is the global-batch loss.
        """
        terms = {"rec": reconstruction_loss(x_TD, out.x_hat_TD)}
        if out.routing is not None:
            all_reduce = None if reducer is None else reducer.all_reduce_sum
            terms["lb"] = load_balancing_loss(out.routing, self.cfg.num_experts, all_reduce)
        if out.aux_recon_TD is not None:
            terms["auxk"] = auxk_loss(x_TD, out.x_hat_TD, out.aux_recon_TD, reducer)
        return terms

    def loss_weights(self, step_fraction: float) -> dict[str, float]:
        return {"lb": self.cfg.lb_alpha * self.d_model, "auxk": self.auxk_alpha}

    def fired_latents(self, out: SAEOutput) -> Tensor:
        return fired_mask(out.latent_values_RK, out.latent_indices_RK, self.num_local_latents)

    @torch.no_grad()
    def encode(self, x_TD: Tensor) -> Latents:
        """Latent activations f = p_{e*} z in token order, with global latent ids."""
        out = self(x_TD)
        values_TK = self.dispatcher.combine(out.latent_values_RK, out.plan)
        # Ids become global before combine: under expert parallelism the rows were encoded on other ranks.
        first_latent = self.experts.first_expert * self.latents_per_expert
        indices_TK = self.dispatcher.combine(out.latent_indices_RK + first_latent, out.plan)
        if out.routing is not None:
            values_TK = values_TK * out.routing.gate_T[:, None]
        return Latents(values_TK, indices_TK)

    @torch.no_grad()
    def decode(self, latents: Latents) -> Tensor:
        """x_hat = sum_j f_j W_dec[id_j] + b_pre for latents from `encode`."""
        local_ids = latents.indices_TK - self.experts.first_expert * self.latents_per_expert
        return sparse_decode(latents.values_TK, local_ids, self.experts.w_dec).float() + self.b_pre.float()
