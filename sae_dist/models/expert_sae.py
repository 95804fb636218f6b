"""SAEs built on a bank of TopK experts (`ExpertSAE`): the Switch SAE (`switch.py`), the dense TopK SAE
(`topk.py`) and BatchTopK experts (`batchtopk.py`) share this forward, loss and encode/decode.

Forward, per token x:  with a router, p = softmax(W_router (x - b_router)) (float32) and E(x) = the e most probable
experts (`sae.experts_per_token`; without a router E = {0}, p_0 = 1); per expert i in E(x),
z_i = TopK_k(ReLU(W_enc^i (x - b_pre) [+ b_enc])); x_hat = sum_{i in E(x)} p_i z_i W_dec^i + b_pre.
Only the chosen experts' encoders run on a token: the dispatcher groups its e rows (one per chosen expert, token-major)
by expert first. e = 1 is the paper's top-1 Switch SAE.

Transcoder (`sae.d_out`, docs/math.md section 9): b_in in place of b_pre before the experts, W_dec^i [M_e, d_out],
y_hat = sum_i p_i z_i W_dec^i + b_out [+ W_skip x]; the loss compares y_hat with the target y. Only x - b_in is
dispatched: the target stays with its token and meets the combined reconstruction there, so the expert code and
the dispatch are those of an SAE.

Union TopK (`sae.union_topk`, e > 1): one TopK over the union of the chosen experts' latents. Per token,
a_i = ReLU(W_enc^i (x - b_pre)) for i in E(x); keep the k largest of the gated activations {p_i a_i[j] : i in E(x),
all j} (decoder rows are unit norm, so this ranks latents by their contribution); z_i = a_i on the kept entries,
0 elsewhere; x_hat = sum_i p_i z_i W_dec^i + b_pre, with f = p_i z_i (k latents per token in all). Gradients flow
through the kept values and through p_i; AuxK (when on) stays per expert, on the residual of this x_hat.
Since p_i > 0 scales expert i's latents alike, the union's top k lies inside the union of the per-expert top k: each
expert computes its own TopK as usual; the k candidate values of each row go back to the token's side (`combine`);
there the top k of the e * k gated candidates becomes a keep mask, sent back to the rows (`dispatch_like`); the
experts zero the dropped candidates and decode. An exact mask, not a threshold: the selection is torch.topk's over
the union, ties included. Rows a capacity limit dropped are never selected ahead of a real candidate.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from sae_dist.config import SAEConfig
from sae_dist.models.auxk import AuxCandidates
from sae_dist.models.base import SAE, Latents, SAEOutput, skip_input
from sae_dist.models.experts import ExpertBank, ExpertOutput, seeded_generator
from sae_dist.models.losses import BatchReducer, auxk_loss, fired_mask, reconstruction_loss
from sae_dist.models.routing import (
    ExpertGroups,
    ExpertRun,
    LocalDispatcher,
    Router,
    TokenDispatcher,
    load_balancing_loss,
)
from sae_dist.models.selection import union_topk_mask
from sae_dist.models.sparse_compute import weighted_row_sum

SWITCH_ARCHITECTURE = "sae_dist_switch"
"""The Switch SAE's architecture in SAELens's registry (`sae_dist/interop/saelens_switch.py` registers it)."""
SWITCH_TRANSCODER_ARCHITECTURE = "sae_dist_switch_transcoder"
"""The Switch transcoder's; 'sae_dist_switch_skip_transcoder' with the skip (`SAE.saelens_transcoder`)."""


class ExpertSAE(SAE):
    """An SAE whose latents live in experts: b_pre, an optional router, and an `ExpertBank` of the experts this
    dispatcher holds here.

    Subclasses choose the router (`routed`), the encoder bias, the default AuxK weight and the bank class.
    """

    encoder_bias: bool = False
    resamples_latents = True
    folds_input_scale = True
    default_auxk_alpha: float = 0.0
    bank_class: type[ExpertBank] = ExpertBank

    def __init__(self, cfg: SAEConfig, d_model: int, seed: int, dispatcher: TokenDispatcher | None = None):
        super().__init__(cfg, d_model)
        self.latents_per_expert = cfg.num_latents // cfg.num_experts
        self.dispatcher = dispatcher or LocalDispatcher(cfg.num_experts)
        self._add_biases()
        self.router = None
        if self.routed:
            self.router = Router(d_model, cfg.num_experts, seeded_generator(seed, 0), cfg.experts_per_token)
        self.experts = self.bank_class(
            num_local=self.dispatcher.num_local_experts,
            latents_per_expert=self.latents_per_expert,
            d_model=d_model,
            encoder_bias=self.encoder_bias,
            seed=seed,
            first_expert=self.dispatcher.first_local_expert,
            encoder_backward=cfg.encoder_backward_kernel,
            decoder=cfg.decoder_kernel,
            d_out=cfg.d_out,
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

    @property
    def b_enc(self) -> Tensor:
        """[L] encoder bias, a view (zeros where the experts have none)."""
        bank = self.experts
        return bank.w_enc.new_zeros(self.num_local_latents) if bank.b_enc is None else bank.b_enc.flatten()

    def decoder_weights(self) -> list[nn.Parameter]:
        return [self.experts.w_dec]

    def saelens_expert_states(self) -> list[tuple[str, dict, dict[str, Tensor]]]:
        """Each expert as a standalone SAELens SAE, (architecture, config entries, weights) per expert here:
        expert e's SAE gives the latents z of a token routed to e, and z W_dec^e + b_pre (before the router gate).
        TopK experts are SAELens's 'topk' SAEs; a transcoder's, which SAELens has no class for, are Switch
        transcoders of one expert (`saelens_switch`)."""
        if self.transcoder:
            return [self.saelens_switch(self.expert_weights(e), None) for e in range(self.num_local_experts)]
        return [("topk", {"k": self.cfg.k}, self.expert_weights(e)) for e in range(self.num_local_experts)]

    def saelens_switch(self, weights: dict[str, Tensor], router: Router | None) -> tuple[str, dict, dict[str, Tensor]]:
        """The 'sae_dist_switch' architecture (a transcoder: 'sae_dist_switch_transcoder', `saelens_transcoder`)
        of the experts `weights` (W_enc [d_in, L], b_enc [L], W_dec [L, d_out], b_dec), selecting by TopK, behind
        `router`. None is one expert behind a zero router W_router [1, d_in]: its gate, a softmax over one logit,
        is exactly 1, so a dense TopK transcoder is this architecture with N = 1, exact and with no code of its own."""
        if router is None:
            w_enc = weights["W_enc"]
            routing = {"W_router": w_enc.new_zeros(1, self.d_in), "b_router": w_enc.new_zeros(self.d_in)}
        else:
            routing = {"W_router": router.weight, "b_router": router.b_router}
        entries = {"k": self.cfg.k, "num_experts": len(routing["W_router"]), "activation": "topk"}
        if not self.transcoder:  # SAELens's Switch SAE has no encoder bias, as a routed SAE has none
            weights = {name: w for name, w in weights.items() if name != "b_enc"}
            return SWITCH_ARCHITECTURE, entries, {**weights, **routing}
        architecture, transcoder_entries, weights = self.saelens_transcoder(SWITCH_TRANSCODER_ARCHITECTURE, weights)
        return architecture, {**transcoder_entries, **entries}, {**weights, **routing}

    def expert_weights(self, expert: int) -> dict[str, Tensor]:
        """Local expert `expert` under SAELens's names: W_enc [d, M_e], b_enc [M_e] (zeros where the experts have
        no encoder bias), W_dec [M_e, d], b_dec = b_pre [d]."""
        bank = self.experts
        b_enc = bank.w_enc.new_zeros(bank.latents_per_expert) if bank.b_enc is None else bank.b_enc[expert]
        return {"W_enc": bank.w_enc[expert].T, "b_enc": b_enc, "W_dec": bank.w_dec[expert], "b_dec": self.b_dec}

    def latent_parameters(self) -> list[nn.Parameter]:
        """The parameters that hold one row per latent, indexed [local expert, latent, ...]: W_enc, W_dec, b_enc."""
        return list(self.experts.parameters())

    @torch.no_grad()
    def reinit_latents_(self, expert_R: Tensor, column_R: Tensor, decoder_RO: Tensor, encoder_RD: Tensor) -> None:
        """Give latent (local expert `expert_R`, column `column_R`) the decoder row `decoder_RO`, the encoder row
        `encoder_RD` and (where there is one) encoder bias 0."""
        bank = self.experts
        bank.w_dec[expert_R, column_R] = decoder_RO.to(bank.w_dec.dtype)
        bank.w_enc[expert_R, column_R] = encoder_RD.to(bank.w_enc.dtype)
        if bank.b_enc is not None:
            bank.b_enc[expert_R, column_R] = 0

    def _fold_encoder_(self, scale: float, target_scale: float) -> None:
        """W_enc * s_x / s_y, b_enc / s_y, b_router / s_x and W_router * s_x: with b_in / s_x (`fold_input_scale_`)
        every pre-activation (x - b_in) W_enc + b_enc becomes 1/s_y times the trained one, which TopK and ReLU pass
        on; the router's logits are unchanged."""
        self.experts.w_enc.mul_(scale / target_scale)
        if self.experts.b_enc is not None:
            self.experts.b_enc.div_(target_scale)
        if self.router is not None:
            self.router.weight.mul_(scale)
            self.router.b_router.div_(scale)

    def bias_parameters(self) -> dict[str, nn.Parameter]:
        biases = {"b_in": self.b_in, "b_out": self.b_out} if self.transcoder else {"b_pre": self.b_pre}
        if self.router is not None:
            biases["b_router"] = self.router.b_router
        return biases

    def in_place_weight_grads(self, enabled: bool) -> AbstractContextManager[None]:
        return self.experts.in_place_weight_grads(enabled)

    def forward(self, x_TD: Tensor, aux_candidates: AuxCandidates | None = None) -> SAEOutput:
        """AuxK (when on) selects among `aux_candidates`; without them it does not run."""
        routing = self.router(x_TD) if self.router is not None else None
        rows_SD = x_TD - self.input_bias
        if routing is None:
            expert_S, scores_S = x_TD.new_zeros(x_TD.shape[0], dtype=torch.long), None
        else:
            expert_S, scores_S = routing.expert_TE.flatten(), routing.gate_TE.detach().flatten()
            if routing.expert_TE.shape[1] > 1:  # one row per (token, chosen expert), token-major
                rows_SD = rows_SD.repeat_interleave(routing.expert_TE.shape[1], dim=0)
        k_aux = self.k_aux if aux_candidates is not None else 0

        def run_experts(rows_RD: Tensor, groups: ExpertGroups) -> tuple[Tensor, tuple]:
            out = self.experts(rows_RD, groups, self.cfg.k, aux_candidates, k_aux)
            return rows_to_combine(out), (out.values_RK, out.indices_RK)

        if self.cfg.union_topk:
            run = self._run_union_topk(rows_SD, expert_S, scores_S, routing.gate_TE.detach(), aux_candidates, k_aux)
        else:
            run = self.dispatcher.run(rows_SD, expert_S, scores_S, run_experts)
        values_RK, indices_RK = run.per_row
        recon_S = run.combined_T.float()
        decoded_SD, aux_SD = recon_S[:, : self.d_out], recon_S[:, self.d_out :]
        aux_recon_TD = None
        if routing is None:
            decoded_TD = decoded_SD
            aux_recon_TD = aux_SD if k_aux else None
        else:
            decoded_TD = gate_weighted_sum(decoded_SD, routing.gate_TE)
            aux_recon_TD = gate_weighted_sum(aux_SD, routing.gate_TE.detach()) if k_aux else None
        # A row dropped by a capacity limit combines to zeros: a token with no row kept has x_hat = b_pre (b_out).
        x_hat_TD = self.reconstruct(decoded_TD, x_TD)
        return SAEOutput(x_hat_TD, values_RK, indices_RK, routing, aux_recon_TD, run.plan.kept_T, run.plan)

    def _run_union_topk(
        self, rows_SD: Tensor, expert_S: Tensor, scores_S: Tensor, gate_TE: Tensor, aux: AuxCandidates | None,
        k_aux: int,
    ) -> ExpertRun:
        """The experts' run under union TopK (module docstring): encode, select on the tokens' side, decode."""
        dispatcher = self.dispatcher
        rows_RD, plan = dispatcher.dispatch(rows_SD, expert_S, scores_S)
        codes = self.experts.encode(rows_RD, plan.groups, self.cfg.k, aux, k_aux)
        candidates_SK = dispatcher.combine(codes.values_RK.detach(), plan)
        keep_SK = union_topk_mask(candidates_SK, gate_TE, plan.kept_T, self.cfg.k)
        keep_RK = dispatcher.dispatch_like(keep_SK, plan)
        out = self.experts.decode(codes._replace(values_RK=codes.values_RK * keep_RK), plan.groups)
        return ExpertRun(dispatcher.combine(rows_to_combine(out), plan), (out.values_RK, out.indices_RK), plan)

    def loss_terms(self, y_TO: Tensor, out: SAEOutput, reducer: BatchReducer | None = None) -> dict[str, Tensor]:
        """Unweighted loss terms against the target `y_TO` (x for an SAE): 'rec', and 'lb' (Switch) and 'auxk'
        (when on).

        `reducer` (the parallel context) makes the batch statistics global: the load-balancing counts and the
        AuxK variance. Each rank's terms are then shares whose mean over ranks is the global-batch loss.
        """
        terms = {"rec": reconstruction_loss(y_TO, out.x_hat_TD)}
        if out.routing is not None:
            all_reduce = None if reducer is None else reducer.all_reduce_sum
            terms["lb"] = load_balancing_loss(out.routing, self.cfg.num_experts, all_reduce)
        if out.aux_recon_TD is not None:
            terms["auxk"] = auxk_loss(y_TO, out.x_hat_TD, out.aux_recon_TD, reducer, self.cfg.auxk_scale)
        return terms

    def loss_weights(self, step_fraction: float) -> dict[str, float]:
        return {"lb": self.cfg.lb_alpha * self.d_model, "auxk": self.auxk_alpha}

    def fired_latents(self, out: SAEOutput) -> Tensor:
        return fired_mask(out.latent_values_RK, out.latent_indices_RK, self.num_local_latents)

    @torch.no_grad()
    def encode(self, x_TD: Tensor) -> Latents:
        """Latent activations f = p_i z_i in token order, [T, e * k] (each chosen expert's k), with global ids;
        [T, k] under union TopK (the kept ones, largest first)."""
        out = self(x_TD)
        values_SK = self.dispatcher.combine(out.latent_values_RK, out.plan)
        # Ids become global before combine: under expert parallelism the rows were encoded on other ranks.
        first_latent = self.experts.first_expert * self.latents_per_expert
        indices_SK = self.dispatcher.combine(out.latent_indices_RK + first_latent, out.plan)
        if out.routing is None:
            return Latents(values_SK, indices_SK)
        values_SK = values_SK * out.routing.gate_TE.flatten()[:, None]
        shape_TE = out.routing.gate_TE.shape
        values_TC, indices_TC = (t.unflatten(0, shape_TE).flatten(1) for t in (values_SK, indices_SK))
        if self.cfg.union_topk:  # the e * k - k dropped candidates are zeros; at most k values are positive
            top = values_TC.topk(self.cfg.k, dim=1)
            return Latents(top.values, indices_TC.gather(1, top.indices))
        return Latents(values_TC, indices_TC)

    @torch.no_grad()
    def decode(self, latents: Latents, x_TD: Tensor | None = None) -> Tensor:
        """x_hat = sum_j f_j W_dec[id_j] + b_pre (a transcoder: + b_out [+ W_skip x]) for latents from `encode`."""
        local_ids = latents.indices_TK - self.experts.first_expert * self.latents_per_expert
        decoded_TO = weighted_row_sum(latents.values_TK, local_ids, self.experts.w_dec).float()
        return self.reconstruct(decoded_TO, skip_input(self, x_TD))


def gate_weighted_sum(rows_SD: Tensor, gate_TE: Tensor) -> Tensor:
    """sum_i p_i y_i over each token's e rows: rows [T * e, D] (token-major), gates [T, e] -> [T, D]."""
    if gate_TE.shape[1] == 1:  # top-1: one product, no [T, 1, D] sum and its backward
        return rows_SD * gate_TE
    return (gate_TE[:, :, None] * rows_SD.unflatten(0, gate_TE.shape)).sum(1)


def rows_to_combine(out: ExpertOutput) -> Tensor:
    """z W_dec per row, with the AuxK reconstruction beside it when AuxK runs: one combine (one all-to-all under
    expert parallelism) for both."""
    return out.recon_RD if out.aux_recon_RD is None else torch.cat([out.recon_RD, out.aux_recon_RD], 1)
