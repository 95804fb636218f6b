"""The grouped-GEMM formulation of the expert compute (`GemmCompute`): grouped GEMMs forward and backward, no
scatter or gather of weight rows.

Same math as the sparse formulation (`sparse_compute.py`), arranged for a GPU, where a dense GEMM over an expert's own
rows is cheap and scatter/gather of weight rows is slow and memory-bound:
- encoder: pre = x W_enc^e^T for every expert's rows in one `torch.nn.functional.grouped_mm`; TopK (and AuxK) on
  it; autograd's backward scatters the selected gradients into a dense [R, M_e] tensor and runs the grouped GEMMs
  for the input and weight gradients;
- decoder: the codes scattered into a dense [R, M_e] tensor, then one grouped GEMM with W_dec^e; the backward is
  two grouped GEMMs and a gather.
Nothing is read back to the host. Where `grouped_mm` cannot run (torch < 2.9, float64, rows not 16-byte aligned)
a per-expert loop of the same GEMMs takes its place. `expert_linear` and `grouped_matmul` also serve the BatchTopK
experts (`batchtopk.py`) and the sparse encoder's forward on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_dist.models.auxk import AuxCandidates
from sae_dist.models.expert_compute import ExpertCodes, ExpertCompute, SharedLatentOrder, compute_dtype
from sae_dist.models.routing import ExpertGroups
from sae_dist.models.selection import aux_topk, topk_relu

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_runs(dtype: torch.dtype, *row_lengths: int) -> bool:
    """Whether `torch.nn.functional.grouped_mm` takes operands of `dtype` whose rows are this long."""
    if not hasattr(F, "grouped_mm") or dtype not in _GROUPED_MM_DTYPES:
        return False
    item = torch.empty((), dtype=dtype).element_size()
    return all(length * item % 16 == 0 for length in row_lengths)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: grouped_mm's backward rejects stride-0 gradients
    (e.g. from `.sum().backward()`)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_matmul(a_RK: Tensor, b_NKM: Tensor, groups: ExpertGroups) -> Tensor:
    """out[r] = a[r] @ b[expert of r] -> [R, M], differentiable, in the autocast dtype when autocast is on."""
    dtype = compute_dtype(a_RK)
    a_RK, b_NKM = a_RK.to(dtype), b_NKM.to(dtype)
    if grouped_mm_runs(dtype, a_RK.shape[1], b_NKM.shape[2], b_NKM.shape[1]):
        return _ContiguousGrad.apply(F.grouped_mm(a_RK, b_NKM, offs=groups.offsets_L))
    parts, start = [], 0
    for expert, count in enumerate(groups.host_counts()):
        parts.append(a_RK[start : start + count] @ b_NKM[expert])
        start += count
    return torch.cat(parts) if parts else a_RK.new_zeros(0, b_NKM.shape[2])


def expert_linear(x_RD: Tensor, w_NMD: Tensor, groups: ExpertGroups, b_NM: Tensor | None = None) -> Tensor:
    """x[r] @ W[expert of r]^T + b[expert of r] -> [R, M_e] (the encoder pre-activations).

    The bias rides inside the GEMM as one more input column, of ones in x and of b in W (padded with zero columns
    to a multiple of 8, which keeps grouped_mm's rows 16-byte aligned): the GEMM accumulates it in float32 and
    its weight gradient yields b's gradient, where adding it afterwards would read and write the whole [R, M_e]
    output once more (at M = 2^20, B = 8192 in bf16, 34 GB) and, for N > 1, gather b into an [R, M_e] tensor and
    scatter its gradient back.
    """
    if b_NM is None:
        return grouped_matmul(x_RD, w_NMD.transpose(-2, -1), groups)
    dtype, d_model = compute_dtype(x_RD), x_RD.shape[1]
    width = -(-(d_model + 1) // 8) * 8
    x_RW = x_RD.new_empty(x_RD.shape[0], width, dtype=dtype)
    x_RW[:, :d_model].copy_(x_RD)
    x_RW[:, d_model] = 1
    x_RW[:, d_model + 1 :] = 0
    w_NMW = w_NMD.new_empty(*w_NMD.shape[:2], width, dtype=dtype)
    w_NMW[..., :d_model].copy_(w_NMD)
    w_NMW[..., d_model].copy_(b_NM)
    w_NMW[..., d_model + 1 :] = 0
    return grouped_matmul(x_RW, w_NMW.transpose(-2, -1), groups)


def gemm_encode(
    x_RD: Tensor,
    w_enc_NMD: Tensor,
    b_enc_NM: Tensor | None,
    groups: ExpertGroups,
    k: int,
    aux: AuxCandidates | None = None,
    k_aux: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`GemmCompute.encode` as (values_RK, flat ids_RK, aux_values_RA, aux flat ids_RA), the aux pair empty
    (A = 0) without candidates; differentiable through autograd."""
    width = w_enc_NMD.shape[1]
    pre_RM = expert_linear(x_RD, w_enc_NMD, groups, b_enc_NM)
    values_RK, columns_RK = topk_relu(pre_RM, k)
    offset_R1 = groups.expert_R[:, None] * width
    if aux is None or not aux.ids_NC.shape[1]:
        empty = pre_RM.new_zeros(pre_RM.shape[0], 0)
        return values_RK, columns_RK + offset_R1, empty, empty.long()
    expert_R = groups.expert_R
    aux_values_RA, aux_columns_RA = aux_topk(pre_RM, aux.ids_NC[expert_R], aux.dead_NC[expert_R], k_aux)
    return values_RK, columns_RK + offset_R1, aux_values_RA, aux_columns_RA + offset_R1


def gemm_decode(values_RK: Tensor, flat_ids_RK: Tensor, w_dec_NMD: Tensor, groups: ExpertGroups) -> Tensor:
    """`GemmCompute.decode`: one grouped GEMM over the codes scattered into [R, M_e]."""
    width = w_dec_NMD.shape[1]
    columns_RK = flat_ids_RK - groups.expert_R[:, None] * width
    dtype = compute_dtype(values_RK)
    # In place into the fresh zeros: the out-of-place scatter copied the [R, M_e] tensor once more.
    codes_RM = values_RK.new_zeros(values_RK.shape[0], width, dtype=dtype).scatter_(1, columns_RK, values_RK.to(dtype))
    return grouped_matmul(codes_RM, w_dec_NMD, groups)


class GemmCompute(ExpertCompute):
    """The grouped-GEMM formulation; stateless: autograd accumulates its gradients, so `in_place_weight_grads`
    changes nothing."""

    def encode(
        self,
        rows_RD: Tensor,
        w_enc_NMD: Tensor,
        b_enc_NM: Tensor | None,
        groups: ExpertGroups,
        k: int,
        aux: AuxCandidates | None,
        k_aux: int,
    ) -> ExpertCodes:
        values_RK, ids_RK, aux_values_RA, aux_ids_RA = gemm_encode(rows_RD, w_enc_NMD, b_enc_NM, groups, k, aux, k_aux)
        if aux is None:
            return ExpertCodes(values_RK, ids_RK, None, None)
        return ExpertCodes(values_RK, ids_RK, aux_values_RA, aux_ids_RA)

    def decode(
        self,
        values_RK: Tensor,
        ids_RK: Tensor,
        w_dec_NMD: Tensor,
        groups: ExpertGroups,
        latent_order: SharedLatentOrder | None = None,
    ) -> Tensor:
        return gemm_decode(values_RK, ids_RK, w_dec_NMD, groups)
