"""The authors' dense formulation of the Switch SAE: every expert's encoder on every token, then mask.

It realises none of the FLOP saving; it is the oracle that the sparse, expert-grouped model is tested against (in
tests/models, tests/train and tests/parallel) and the dense-then-mask baseline of `benchmarks/bench_step.py`, which
imports it as `tests.reference` with the repository root on its path. It stays out of the package: nothing that
trains or evaluates runs it.

Transcoders (docs/math.md section 9): every function takes the target `y_TD` (None: an SAE, y = x) and reads the model's
input and output biases (b_in, b_out; both b_pre for an SAE) and its skip W_skip x where it has one. The BatchTopK and
ReLU oracles are written out here too, so one `naive_terms` serves every architecture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_dist.models.expert_sae import ExpertSAE


def all_latents(z_TM: Tensor, expert_T: Tensor, num_experts: int) -> Tensor:
    """Place each token's latents in its expert's columns of a dense [T, N * M_e] code."""
    z_TNM = z_TM.new_zeros(z_TM.shape[0], num_experts, z_TM.shape[1])
    z_TNM[torch.arange(z_TM.shape[0], device=z_TM.device), expert_T] = z_TM
    return z_TNM.flatten(1)


def dense_decode(z_TM: Tensor, expert_T: Tensor, w_dec_NMD: Tensor) -> Tensor:
    """The decode of a dense code of all latents: one GEMM with the [N * M_e, d] decoder."""
    return all_latents(z_TM, expert_T, w_dec_NMD.shape[0]) @ w_dec_NMD.flatten(0, 1)


def skip_term(sae, x_TD: Tensor):
    """W_skip x in float32, or 0 without a skip."""
    return 0.0 if sae.w_skip is None else (x_TD @ sae.w_skip.T).float()


def naive_forward(sae: ExpertSAE, x_TD: Tensor, dead_mask_L: Tensor | None = None, kept_TE: Tensor | None = None,
                  y_TD: Tensor | None = None):
    """Dense forward with the weights of `sae`: (x_hat_TD, f_TL = sum over chosen experts of p * z, over all local
    latents, loss terms against `y_TD`, default x). Top-e routing: each of a token's e most probable experts is one
    slot, decoded on its own; under union TopK the slots' z come from one TopK over all of the chosen experts' gated
    activations. `kept_TE` (bool [T, e]): slots a capacity limit dropped add nothing and take no part in the union."""
    y_TD = x_TD if y_TD is None else y_TD
    bank = sae.experts
    pre_TNM = torch.einsum("td,nmd->tnm", x_TD - sae.input_bias, bank.w_enc)
    if bank.b_enc is not None:
        pre_TNM = pre_TNM + bank.b_enc
    acts_TNM = F.relu(pre_TNM)
    tokens = torch.arange(x_TD.shape[0], device=x_TD.device)
    if sae.router is not None:
        logits = F.linear(x_TD.float() - sae.router.b_router.float(), sae.router.weight.float())
        probs_TN = logits.softmax(-1)
        e = sae.cfg.experts_per_token
        expert_TE = probs_TN.argmax(-1, keepdim=True) if e == 1 else probs_TN.topk(e, -1).indices
        gate_TE = probs_TN.gather(1, expert_TE)
    else:
        expert_TE = torch.zeros(x_TD.shape[0], 1, dtype=torch.long, device=x_TD.device)
        probs_TN, gate_TE = None, torch.ones(x_TD.shape[0], 1, device=x_TD.device)
    kept_TE = torch.ones_like(expert_TE, dtype=torch.bool) if kept_TE is None else kept_TE
    if sae.cfg.union_topk:
        gated_TEM = (acts_TNM[tokens[:, None], expert_TE] * gate_TE[:, :, None]).masked_fill(
            ~kept_TE[:, :, None], float("-inf"))
        union_idx = gated_TEM.flatten(1).topk(sae.cfg.k, dim=-1).indices
        union_TEM = torch.zeros_like(gated_TEM).flatten(1).scatter(1, union_idx, 1.0).view_as(gated_TEM)
    x_hat = sae.output_bias.float() + skip_term(sae, x_TD)
    f_TL, aux_TD = 0.0, 0.0
    for slot in range(expert_TE.shape[1]):
        expert_T, gate_T = expert_TE[:, slot], gate_TE[:, slot] * kept_TE[:, slot]
        acts_TM = acts_TNM[tokens, expert_T]
        if sae.cfg.union_topk:
            mask_TM = union_TEM[:, slot]
        else:
            top_idx = acts_TM.topk(sae.cfg.k, dim=-1).indices
            mask_TM = torch.zeros_like(acts_TM).scatter(1, top_idx, 1.0)
        z_TM = acts_TM * mask_TM
        x_hat = x_hat + gate_T[:, None] * dense_decode(z_TM, expert_T, bank.w_dec).float()
        f_TL = f_TL + all_latents(z_TM * gate_T[:, None], expert_T, bank.num_local)
        if dead_mask_L is not None:
            dead_TM = dead_mask_L.view(bank.num_local, -1)[expert_T]
            aux_acts = acts_TM.masked_fill(~dead_TM, float("-inf"))
            k_aux = min(sae.k_aux, acts_TM.shape[1])
            aux_vals, aux_idx = aux_acts.topk(k_aux, dim=-1)
            aux_z = torch.zeros_like(acts_TM).scatter(1, aux_idx, aux_vals.clamp_min(0))
            aux_TD = aux_TD + gate_T.detach()[:, None] * dense_decode(aux_z, expert_T, bank.w_dec).float()
    terms = {"rec": (y_TD.float() - x_hat).pow(2).sum(-1).mean()}
    if probs_TN is not None:
        n = sae.cfg.num_experts
        f_N = torch.bincount(expert_TE.flatten(), minlength=n).float() / expert_TE.numel()
        terms["lb"] = n * (f_N * probs_TN.mean(0)).sum()
    if dead_mask_L is not None:
        residual = (y_TD.float() - x_hat).detach()
        centred = y_TD.float() - y_TD.float().mean(0)
        error = (aux_TD - residual).pow(2).sum()
        terms["auxk"] = error / centred.pow(2).sum()
        if sae.cfg.auxk_scale == "gao":  # (S / T) * Var(y) / Var(e)
            centred_e = residual - residual.mean(0)
            terms["auxk"] = error / x_TD.shape[0] * centred.pow(2).sum() / centred_e.pow(2).sum()
    return x_hat, f_TL, terms


def naive_batchtopk_forward(sae, x_TD: Tensor, y_TD: Tensor | None = None):
    """BatchTopK experts, every expert on every token, then masks: (x_hat, dense codes z [T, M_e], expert, loss
    terms against `y_TD`, default x). In training each expert keeps its rows' count * k largest activations; in
    eval those above its threshold."""
    y_TD = x_TD if y_TD is None else y_TD
    bank, k = sae.experts, sae.cfg.k
    probs_TN = F.linear(x_TD.float() - sae.router.b_router.float(), sae.router.weight.float()).softmax(-1)
    expert_T = probs_TN.argmax(-1)
    gate_T = probs_TN.gather(1, expert_T[:, None]).squeeze(1)
    pre_TNM = torch.einsum("td,nmd->tnm", x_TD - sae.input_bias, bank.w_enc)
    acts_TM = F.relu(pre_TNM)[torch.arange(len(x_TD)), expert_T]
    keep_TM = torch.zeros_like(acts_TM, dtype=torch.bool)
    for e in range(bank.num_local):
        rows = (expert_T == e).nonzero().squeeze(1)
        if sae.training and len(rows):
            block = acts_TM[rows].detach()
            threshold = block.flatten().topk(len(rows) * k).values.min()
            keep_TM[rows] = block >= threshold
        elif len(rows):
            keep_TM[rows] = acts_TM[rows] > bank.threshold_N[e]
    z_TM = acts_TM * keep_TM
    # The model's output precision: x_hat and the losses in float32 (as `naive_forward`).
    x_hat = gate_T[:, None] * torch.einsum("tm,tmd->td", z_TM, bank.w_dec[expert_T]).float()
    x_hat = x_hat + sae.output_bias.float() + skip_term(sae, x_TD)
    n = sae.cfg.num_experts
    f_N = (torch.bincount(expert_T, minlength=n).to(x_TD.dtype) / len(x_TD)).float()
    terms = {"rec": (y_TD.float() - x_hat).pow(2).sum(-1).mean(), "lb": n * (f_N * probs_TN.mean(0)).sum()}
    return x_hat, z_TM, expert_T, terms


def naive_relu_forward(sae, x_TD: Tensor, y_TD: Tensor | None = None):
    """The ReLU SAE written out: (x_hat, f [T, M], loss terms against `y_TD`, default x)."""
    y_TD = x_TD if y_TD is None else y_TD
    f_TM = F.relu((x_TD - sae.input_bias) @ sae.w_enc.T + sae.b_enc)
    x_hat = (f_TM @ sae.w_dec).float() + sae.output_bias.float() + skip_term(sae, x_TD)
    l1 = (f_TM.abs() * sae.w_dec.norm(dim=-1)).sum(-1).mean()
    return x_hat, f_TM, {"rec": (y_TD.float() - x_hat).pow(2).sum(-1).mean(), "l1": l1}


def naive_terms(sae, x_TD: Tensor, dead_mask_L: Tensor | None = None, y_TD: Tensor | None = None):
    """(x_hat, per-token latent activations [T, local latents], loss terms) of any architecture's oracle."""
    if sae.kind == "relu":
        return naive_relu_forward(sae, x_TD, y_TD)
    if sae.kind == "batchtopk":
        x_hat, z_TM, expert_T, terms = naive_batchtopk_forward(sae, x_TD, y_TD)
        return x_hat, all_latents(z_TM, expert_T, sae.experts.num_local), terms
    return naive_forward(sae, x_TD, dead_mask_L, y_TD=y_TD)


def decoder_parameter(sae):
    """The parameter whose rows are unit-norm decoder directions."""
    return sae.w_dec if sae.kind == "relu" else sae.experts.w_dec


def reference_train_step(
    sae: ExpertSAE,
    optimizer: torch.optim.Optimizer,
    x_TD: Tensor,
    max_norm: float,
    dead_mask_L: Tensor | None = None,
    step_fraction: float = 0.0,
    y_TD: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One training step written the straightforward way (docs/math.md section 4), on the dense formulation.

    Renormalise decoder rows; dense forward and loss; backward; clip the gradient norm (`clip_grad_norm_`); remove
    each decoder row's parallel gradient component; `optimizer.step()` (a plain, unfused Adam). The oracle of the
    trainer's fused step and the dense-then-mask baseline of the benchmarks; any architecture, against the target
    `y_TD` (default x). Returns (loss, f_TL).
    """
    w_dec = decoder_parameter(sae)
    with torch.no_grad():
        w_dec.div_(w_dec.norm(dim=-1, keepdim=True))
    _, f_TL, terms = naive_terms(sae, x_TD, dead_mask_L, y_TD)
    loss = sum(sae.loss_weights(step_fraction).get(name, 1.0) * term for name, term in terms.items())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), max_norm)
    with torch.no_grad():
        rows = w_dec / w_dec.norm(dim=-1, keepdim=True)
        w_dec.grad -= (w_dec.grad * rows).sum(-1, keepdim=True) * rows
    optimizer.step()
    return loss.detach(), f_TL.detach()
