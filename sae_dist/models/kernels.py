"""Sparse compute kernels shared by every TopK-style SAE: a grouped TopK encoder and a sparse decoder.

Rows arrive grouped by expert (expert e owns rows [offsets[e], offsets[e+1])). The encoder runs one GEMM per
expert on that expert's rows only, so a token pays for M/N latents, not M. Its backward never materialises the
dense [rows, latents] gradient: the input gradient is an `embedding_bag` over the k active encoder rows and the
weight gradient an `index_add` over them. The decoder reads only the k active rows per token (`embedding_bag`),
whose backward is sparse as well.

Latent ids are "flat": expert e's latent j is e * M_e + j, indexing the [N * M_e, d] flattened weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows per chunk in the encoder weight-gradient: bounds the [chunk, k, d] temporary.
_GRAD_CHUNK_ROWS = 1024


def _topk_relu(pre_RM: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """TopK of ReLU(pre): values >= 0 (zeros where fewer than k are positive) and their column indices."""
    values_RK, indices_RK = torch.topk(pre_RM, k, dim=-1, sorted=False)
    return values_RK.clamp_min(0), indices_RK


class GroupedTopKEncoder(torch.autograd.Function):
    """z = TopK_k(ReLU(W_enc^e x + b_enc^e)) for rows grouped by expert, with a sparse backward.

    Optionally also returns the AuxK selection: the top k_aux ReLU pre-activations among dead latents, from the
    same GEMM. Both selections share one sparse backward.
    """

    @staticmethod
    def forward(ctx, x_RD, w_enc_ND_flat, b_enc_flat, counts, k, dead_mask_flat, k_aux):
        num_experts = len(counts)
        latents_per_expert = w_enc_ND_flat.shape[0] // num_experts
        rows = x_RD.shape[0]
        values_RK = x_RD.new_zeros(rows, k)
        indices_RK = torch.zeros(rows, k, dtype=torch.long, device=x_RD.device)
        aux_values_RA = x_RD.new_zeros(rows, k_aux)
        aux_indices_RA = torch.zeros(rows, k_aux, dtype=torch.long, device=x_RD.device)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            stop = start + count
            lo, hi = expert * latents_per_expert, (expert + 1) * latents_per_expert
            bias = None if b_enc_flat is None else b_enc_flat[lo:hi]
            pre_CM = F.linear(x_RD[start:stop], w_enc_ND_flat[lo:hi], bias)
            values, local = _topk_relu(pre_CM, k)
            values_RK[start:stop], indices_RK[start:stop] = values, local + lo
            if k_aux:
                dead_M = dead_mask_flat[lo:hi]
                aux_pre = pre_CM.masked_fill(~dead_M, float("-inf"))
                aux_k = min(k_aux, latents_per_expert)
                values, local = _topk_relu(aux_pre, aux_k)
                # -inf entries (alive latents picked when few are dead) clamp to 0 and so contribute nothing.
                aux_values_RA[start:stop, :aux_k], aux_indices_RA[start:stop, :aux_k] = values, local + lo
            start = stop
        ctx.save_for_backward(x_RD, w_enc_ND_flat, values_RK, indices_RK, aux_values_RA, aux_indices_RA)
        ctx.has_bias = b_enc_flat is not None
        ctx.mark_non_differentiable(indices_RK, aux_indices_RA)
        return values_RK, indices_RK, aux_values_RA, aux_indices_RA

    @staticmethod
    def backward(ctx, grad_values_RK, _grad_indices, grad_aux_RA, _grad_aux_indices):
        x_RD, weight_LD, values_RK, indices_RK, aux_values_RA, aux_indices_RA = ctx.saved_tensors
        # ReLU: no gradient flows through selections that were clamped to zero.
        grad_RS = torch.cat(
            [grad_values_RK * (values_RK > 0), grad_aux_RA * (aux_values_RA > 0)], dim=1
        ).to(weight_LD.dtype)
        indices_RS = torch.cat([indices_RK, aux_indices_RA], dim=1)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices_RS, weight_LD, mode="sum", per_sample_weights=grad_RS)
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(weight_LD)
            for start in range(0, x_RD.shape[0], _GRAD_CHUNK_ROWS):
                rows = slice(start, start + _GRAD_CHUNK_ROWS)
                outer_RSD = grad_RS[rows].unsqueeze(2) * x_RD[rows].unsqueeze(1).to(weight_LD.dtype)
                grad_w.index_add_(0, indices_RS[rows].flatten(), outer_RSD.flatten(0, 1))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = weight_LD.new_zeros(weight_LD.shape[0])
            grad_b.index_add_(0, indices_RS.flatten(), grad_RS.flatten())
        return grad_x, grad_w, grad_b, None, None, None, None


def grouped_topk_encode(
    x_RD: Tensor,
    w_enc_LD: Tensor,
    b_enc_L: Tensor | None,
    counts: list[int],
    k: int,
    dead_mask_L: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Encode expert-grouped rows.

    x_RD: rows, already centred (x - b_pre), grouped by expert with `counts[e]` rows for expert e.
    w_enc_LD: flattened encoder weights [N * M_e, d]; b_enc_L: [N * M_e] or None.
    Returns (values_RK, flat_indices_RK, aux_values_RA, aux_flat_indices_RA); the aux pair is empty (A = 0)
    unless `k_aux` > 0, in which case it selects among latents where `dead_mask_L` is True.
    """
    if sum(counts) != x_RD.shape[0]:
        raise ValueError(f"expert counts sum to {sum(counts)} but there are {x_RD.shape[0]} rows")
    if k_aux and dead_mask_L is None:
        raise ValueError("k_aux > 0 needs a dead_mask_L")
    return GroupedTopKEncoder.apply(x_RD, w_enc_LD, b_enc_L, list(counts), k, dead_mask_L, k_aux)


def sparse_decode(values_RK: Tensor, flat_indices_RK: Tensor, w_dec_LD: Tensor) -> Tensor:
    """sum_j values[r, j] * W_dec[indices[r, j]] -> [R, d], reading only the k active decoder rows."""
    return F.embedding_bag(flat_indices_RK, w_dec_LD, mode="sum", per_sample_weights=values_RK.to(w_dec_LD.dtype))
