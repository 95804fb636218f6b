"""The authors' dense formulation of the Switch SAE: every expert's encoder on every token, then mask.

It realises none of the FLOP saving; it is the oracle that the sparse, expert-grouped model is tested against and
the baseline that benchmarks compare with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_dist.models.switch import SwitchSAE


def dense_decode(z_TM: Tensor, expert_T: Tensor, w_dec_NMD: Tensor) -> Tensor:
    """Place each token's latents in its expert's columns of a dense [T, N, M_e] code, then one dense GEMM."""
    z_TNM = z_TM.new_zeros(z_TM.shape[0], *w_dec_NMD.shape[:2])
    z_TNM[torch.arange(z_TM.shape[0]), expert_T] = z_TM
    return z_TNM.flatten(1) @ w_dec_NMD.flatten(0, 1)


def naive_forward(sae: SwitchSAE, x_TD: Tensor, dead_mask_L: Tensor | None = None):
    """Dense forward with the weights of `sae`: (x_hat_TD, f_TM = p * z in dense local-expert columns, loss terms)."""
    bank = sae.experts
    pre_TNM = torch.einsum("td,nmd->tnm", x_TD - sae.b_pre, bank.w_enc)
    if bank.b_enc is not None:
        pre_TNM = pre_TNM + bank.b_enc
    acts_TNM = F.relu(pre_TNM)
    if sae.router is not None:
        logits = F.linear(x_TD.float() - sae.router.b_router.float(), sae.router.weight.float())
        probs_TN = logits.softmax(-1)
        expert_T = probs_TN.argmax(-1)
        gate_T = probs_TN.gather(1, expert_T[:, None]).squeeze(1)
    else:
        expert_T = torch.zeros(x_TD.shape[0], dtype=torch.long)
        probs_TN, gate_T = None, torch.ones(x_TD.shape[0])
    tokens = torch.arange(x_TD.shape[0])
    acts_TM = acts_TNM[tokens, expert_T]
    top_idx = acts_TM.topk(sae.cfg.k, dim=-1).indices
    mask_TM = torch.zeros_like(acts_TM).scatter(1, top_idx, 1.0)
    z_TM = acts_TM * mask_TM
    decoded_TD = dense_decode(z_TM, expert_T, bank.w_dec)
    x_hat = gate_T[:, None] * decoded_TD.float() + sae.b_pre.float()
    terms = {"rec": (x_TD.float() - x_hat).pow(2).sum(-1).mean()}
    if probs_TN is not None:
        n = sae.cfg.num_experts
        f_N = torch.bincount(expert_T, minlength=n).float() / x_TD.shape[0]
        terms["lb"] = n * (f_N * probs_TN.mean(0)).sum()
    if dead_mask_L is not None:
        dead_TM = dead_mask_L.view(bank.num_local, -1)[expert_T]
        aux_acts = acts_TM.masked_fill(~dead_TM, float("-inf"))
        k_aux = min(sae.k_aux, acts_TM.shape[1])
        aux_vals, aux_idx = aux_acts.topk(k_aux, dim=-1)
        aux_z = torch.zeros_like(acts_TM).scatter(1, aux_idx, aux_vals.clamp_min(0))
        aux_TD = dense_decode(aux_z, expert_T, bank.w_dec).float()
        if probs_TN is not None:
            aux_TD = aux_TD * gate_T.detach()[:, None]
        residual = (x_TD.float() - x_hat).detach()
        centred = x_TD.float() - x_TD.float().mean(0)
        terms["auxk"] = (aux_TD - residual).pow(2).sum() / centred.pow(2).sum()
    return x_hat, z_TM * gate_T[:, None], terms
