"""The sparse formulation of the expert compute (`SparseCompute`): TopK encoder and decoder whose backward never
goes dense.

Rows arrive grouped by local expert (`ExpertGroups`). The encoder runs one GEMM per expert on that expert's rows
only, so a token pays for M/N latents, not M, and picks its TopK inside the expert (and, for AuxK, the top k_aux
among candidate dead columns). The backward touches only the selected latents: the input gradient is an
`embedding_bag` over the selected encoder rows, the weight gradient a scatter of outer products into them. The
decoder reads the k selected rows per token (`embedding_bag`); its backward is a sampled GEMM for the values and
the same scatter for the weights. The scatters and the sampled GEMM take the ids in latent-major order, sorted once
per step for the decoder's and the encoder's backward (`SharedLatentOrder`). On a CPU this beats dense GEMMs over
the scattered gradient by far; on a GPU scatter and gather are memory-bound, and `gemm_compute.py` holds the GEMM
formulation of the same math.

Inside `SparseCompute.in_place_weight_grads(True)`, the backward writes the weight gradients straight into the
parameters' `.grad` instead of returning a new [N, M_e, d] tensor for autograd to accumulate: where `.grad` is None,
into the weight's buffer of the previous steps, overwritten (`SparseCompute.weight_grad`); a fresh gradient of that
size costs a CPU more in page faults than the scatter itself, and zeroing one costs a pass over it. Outside it,
gradients flow through autograd as usual (what `torch.autograd.grad` needs).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from sae_dist.models.auxk import AuxCandidates
from sae_dist.models.expert_compute import (
    ExpertCodes,
    ExpertCompute,
    LatentMajor,
    SharedLatentOrder,
    compute_dtype,
)
from sae_dist.models.gemm_compute import gemm_encode
from sae_dist.models.routing import ExpertGroups
from sae_dist.models.selection import aux_topk

PRE_CHUNK_ELEMENTS = 1 << 25
"""Pre-activations per encoder chunk on a CPU (128 MiB in float32), computed into one workspace that the compute
keeps: a fresh tensor of that size would be mapped and page-faulted afresh at every chunk."""
MIN_CHUNK_COLUMNS = 256


def _csr(crow: Tensor, columns: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A sparse CSR matrix, valid by construction (so unchecked); torch's one-time 'beta' notice is not for users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, columns, values, size=size, check_invariants=False)


def scatter_outer_(grad_LD: Tensor, layout: LatentMajor, coef_RS: Tensor, rows_RD: Tensor, beta: float) -> None:
    """grad_LD = beta * grad_LD + sum over r, s of coef[r, s] * rows[r] in row indices[r, s], in place (`layout`:
    the indices' order); beta = 0 ignores what grad_LD held (no zeroing pass, NaN or not).

    One sparse-dense product grad = beta * grad + C @ rows, with C the [L, R] matrix of the coefficients in
    latent-major CSR layout: each latent's row sums its own rows in a fixed order, in parallel over latents, with
    no [R, S, d] temporary and none of `index_add_`'s cost in proportion to the whole of `grad`.
    """
    if not layout.order_N.numel():
        if beta == 0:
            grad_LD.zero_()
        return
    coef_LR = _csr(layout.crow_L, layout.rows_N, coef_RS.flatten()[layout.order_N].to(grad_LD.dtype), layout.shape)
    torch.addmm(grad_LD, coef_LR, rows_RD.to(grad_LD.dtype), beta=beta, out=grad_LD)


def gathered_dots(layout: LatentMajor, weight_LD: Tensor, rows_RD: Tensor, per_row: int) -> Tensor:
    """out[r, j] = weight[indices[r, j]] . rows[r], [R, per_row] in the weight's dtype (`layout`: the indices'
    order; the indices of a row are distinct).

    `torch.sparse.sampled_addmm` computes weight @ rows^T only where a latent's rows are, reading each weight row
    once, with no [R, K, d] gather; the dots come in latent-major order and go back to their (r, j) places.
    """
    rows = rows_RD.shape[0]
    if not layout.order_N.numel():
        return weight_LD.new_zeros(rows, per_row)
    pattern = _csr(layout.crow_L, layout.rows_N, weight_LD.new_zeros(layout.order_N.numel()), layout.shape)
    dots_N = torch.sparse.sampled_addmm(pattern, weight_LD, rows_RD.to(weight_LD.dtype).T, beta=0.0).values()
    return torch.empty_like(dots_N).index_copy_(0, layout.order_N, dots_N).view(rows, per_row)


def weighted_row_sum(values_RK: Tensor, ids_RK: Tensor, weight_NMD: Tensor) -> Tensor:
    """sum_j values[r, j] * weight[ids[r, j]] -> [R, d] in the weight's dtype, reading only the selected rows (flat
    ids into the [N * M_e, d] flattened weight): the sparse decoder's forward, without autograd."""
    weight_LD = weight_NMD.flatten(0, 1)
    return F.embedding_bag(ids_RK, weight_LD, mode="sum", per_sample_weights=values_RK.to(weight_LD.dtype))


class SparseCompute(ExpertCompute):
    """The sparse formulation, owning what it reuses from step to step: the encoder's pre-activation workspace per
    (device, dtype) and, per weight, the buffer its in-place gradient is written into."""

    def __init__(self, chunk_elements: int = PRE_CHUNK_ELEMENTS, min_chunk_columns: int = MIN_CHUNK_COLUMNS):
        self.chunk_elements = chunk_elements
        """Pre-activations per encoder chunk on a CPU (`PRE_CHUNK_ELEMENTS`)."""
        self.min_chunk_columns = min_chunk_columns
        """The narrowest chunk of latents, however many rows."""
        self.in_place = False
        """Whether graphs built now write their weight gradients into `.grad` (`in_place_weight_grads`)."""
        self._workspaces: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._grad_buffers = WeakIdKeyDictionary()
        """Per weight, the tensor its gradient is written into at every step (also the step's `.grad`)."""

    def __deepcopy__(self, memo: dict) -> SparseCompute:
        """A copy shares no buffer: workspaces and gradient buffers are made afresh on first use."""
        copy = SparseCompute(self.chunk_elements, self.min_chunk_columns)
        copy.in_place = self.in_place
        return copy

    @contextmanager
    def in_place_weight_grads(self, enabled: bool) -> Iterator[None]:
        previous, self.in_place = self.in_place, enabled
        try:
            yield
        finally:
            self.in_place = previous

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
        """`ExpertCompute.encode`; the codes carry the sort of their ids that the two backwards share."""
        if rows_RD.shape[0] != groups.expert_R.shape[0]:
            raise ValueError(f"expert groups cover {groups.expert_R.shape[0]} rows but there are {rows_RD.shape[0]}")
        order = SharedLatentOrder()
        values_RK, ids_RK, aux_values_RA, aux_ids_RA = SparseTopKEncoder.apply(
            rows_RD, w_enc_NMD, b_enc_NM, groups, k, aux, k_aux, order, self
        )
        if aux is None:
            return ExpertCodes(values_RK, ids_RK, None, None, order)
        return ExpertCodes(values_RK, ids_RK, aux_values_RA, aux_ids_RA, order)

    def decode(
        self,
        values_RK: Tensor,
        ids_RK: Tensor,
        w_dec_NMD: Tensor,
        groups: ExpertGroups,
        latent_order: SharedLatentOrder | None = None,
    ) -> Tensor:
        order = latent_order if latent_order is not None else SharedLatentOrder()
        return SparseDecoder.apply(values_RK, ids_RK, w_dec_NMD, order, self)

    def weight_grad(self, param: nn.Parameter, in_place: bool) -> tuple[Tensor, float]:
        """The tensor a weight gradient is written into and the beta to write it with (`scatter_outer_`).

        In place, `param.grad` itself: where the step has not set it yet (None), the weight's buffer of the
        previous steps becomes `.grad` and is overwritten (beta 0: no zeroing pass over [M, d], nor its read; no
        fresh tensor to fault in on a CPU, to capture or allocate on a GPU); else it is added to (beta 1).
        Otherwise a new tensor.
        """
        if not in_place:
            return torch.empty_like(param), 0.0
        if param.grad is not None:
            return param.grad, 1.0
        buffer = self._grad_buffers.get(param)
        if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (param.shape, param.dtype, param.device):
            buffer = self._grad_buffers[param] = torch.empty_like(param)
        param.grad = buffer
        return buffer, 0.0

    @torch.no_grad()
    def select_latents(
        self,
        x_RD: Tensor,
        w_enc_NMD: Tensor,
        b_enc_NM: Tensor | None,
        groups: ExpertGroups,
        k: int,
        aux: AuxCandidates | None,
        k_aux: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The encoder forward without autograd: (values_RK, flat ids_RK, aux_values_RA, aux flat ids_RA).

        On a CPU, each expert's rows in column chunks (`_expert_topk`); elsewhere, or without the counts on the
        host, the grouped GEMM of the GEMM formulation. The aux pair is empty (A = 0) without candidates.
        """
        if groups.counts is None or x_RD.device.type != "cpu":
            return gemm_encode(x_RD, w_enc_NMD, b_enc_NM, groups, k, aux, k_aux)
        width = w_enc_NMD.shape[1]
        rows = x_RD.shape[0]
        aux_width = 0 if aux is None else min(k_aux, aux.ids_NC.shape[1])
        values_RK, ids_RK = x_RD.new_zeros(rows, k), torch.zeros(rows, k, dtype=torch.long, device=x_RD.device)
        aux_values_RA = x_RD.new_zeros(rows, aux_width)
        aux_ids_RA = torch.zeros(rows, aux_width, dtype=torch.long, device=x_RD.device)
        start = 0
        for expert, count in enumerate(groups.host_counts()):
            if count:
                part = slice(start, start + count)
                bias_M = None if b_enc_NM is None else b_enc_NM[expert]
                aux_ids, aux_dead = (aux.ids_NC[expert], aux.dead_NC[expert]) if aux_width else (None, None)
                values, columns, aux_values, aux_columns = self._expert_topk(
                    x_RD[part], w_enc_NMD[expert], bias_M, k, aux_ids, aux_dead, k_aux
                )
                values_RK[part], ids_RK[part] = values, columns + expert * width
                if aux_width:
                    aux_values_RA[part], aux_ids_RA[part] = aux_values, aux_columns + expert * width
            start += count
        return values_RK, ids_RK, aux_values_RA, aux_ids_RA

    def _expert_topk(
        self,
        x_CD: Tensor,
        w_MD: Tensor,
        b_M: Tensor | None,
        k: int,
        aux_ids_A: Tensor | None,
        aux_dead_A: Tensor | None,
        k_aux: int,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """One expert's TopK (and AuxK among candidate columns) over its rows, in chunks of latents.

        Chunking the latents rather than the rows reads each weight once (a GEMM over a few rows re-packs the whole
        weight matrix); the TopK of the union of every chunk's TopK is the TopK of the row.
        """
        rows, width = x_CD.shape[0], w_MD.shape[0]
        chunk = min(width, max(self.min_chunk_columns, self.chunk_elements // max(rows, 1)))
        dtype = compute_dtype(x_CD)
        x_CD, workspace = x_CD.to(dtype), self._workspace(x_CD.device, dtype, rows * chunk)
        picks = min(k, chunk)
        starts = range(0, width, chunk)
        values_CP = x_CD.new_full((rows, picks * len(starts)), float("-inf"))
        columns_CP = torch.zeros(values_CP.shape, dtype=torch.long, device=x_CD.device)
        aux_pre_CA = None if aux_ids_A is None else x_CD.new_empty(rows, aux_ids_A.numel())
        for index, lo in enumerate(starts):
            hi = min(lo + chunk, width)
            pre_CM = workspace[: rows * (hi - lo)].view(rows, hi - lo)
            weight_DM = w_MD[lo:hi].to(dtype).T
            with torch.autocast(x_CD.device.type, enabled=False):  # inputs already in the compute dtype
                if b_M is None:
                    torch.mm(x_CD, weight_DM, out=pre_CM)
                else:
                    torch.addmm(b_M[lo:hi].to(dtype), x_CD, weight_DM, out=pre_CM)
            values, columns = torch.topk(pre_CM, min(k, hi - lo), dim=1, sorted=False)
            slots = slice(index * picks, index * picks + values.shape[1])
            values_CP[:, slots], columns_CP[:, slots] = values, columns + lo
            if aux_pre_CA is not None:
                inside = ((aux_ids_A >= lo) & (aux_ids_A < hi)).nonzero().squeeze(1)  # host-side: this is the CPU path
                aux_pre_CA[:, inside] = pre_CM[:, aux_ids_A[inside] - lo]
        if len(starts) > 1:
            top = values_CP.topk(k, dim=1, sorted=False)
            values_CP, columns_CP = top.values, columns_CP.gather(1, top.indices)
        values_CK, columns_CK = F.relu(values_CP), columns_CP
        if aux_pre_CA is None:
            return values_CK, columns_CK, None, None
        positions_CA = torch.arange(aux_ids_A.numel(), device=x_CD.device).expand(rows, -1)
        aux_values, picks_CA = aux_topk(aux_pre_CA, positions_CA, aux_dead_A.expand(rows, -1), k_aux)
        return values_CK, columns_CK, aux_values, aux_ids_A[picks_CA]

    def _workspace(self, device: torch.device, dtype: torch.dtype, numel: int) -> Tensor:
        """A flat buffer of at least `numel` elements, reused by every call (grown when a call needs more)."""
        buffer = self._workspaces.get((device, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = self._workspaces[(device, dtype)] = torch.empty(numel, device=device, dtype=dtype)
        return buffer


class SparseTopKEncoder(torch.autograd.Function):
    """z = TopK_k(ReLU(W_enc^e x + b_enc^e)) (and the AuxK selection) with a sparse backward."""

    @staticmethod
    def forward(ctx, x_RD, w_enc_NMD, b_enc_NM, groups, k, aux, k_aux, order, compute):
        values_RK, ids_RK, aux_values_RA, aux_ids_RA = compute.select_latents(
            x_RD, w_enc_NMD, b_enc_NM, groups, k, aux, k_aux
        )
        # Saved (so autograd notices an in-place change before the backward) and kept as the parameter whose
        # .grad the in-place backward writes.
        ctx.save_for_backward(x_RD, w_enc_NMD, values_RK, ids_RK, aux_values_RA, aux_ids_RA)
        ctx.weight, ctx.has_bias, ctx.order = w_enc_NMD, b_enc_NM is not None, order
        ctx.compute, ctx.in_place = compute, compute.in_place
        ctx.mark_non_differentiable(ids_RK, aux_ids_RA)
        return values_RK, ids_RK, aux_values_RA, aux_ids_RA

    @staticmethod
    def backward(ctx, grad_values_RK, _grad_ids, grad_aux_RA, _grad_aux_ids):
        x_RD, weight_NMD, values_RK, ids_RK, aux_values_RA, aux_ids_RA = ctx.saved_tensors
        weight_LD = weight_NMD.flatten(0, 1)
        # ReLU: no gradient flows through selections that were clamped to zero.
        grad_RS = torch.cat([grad_values_RK * (values_RK > 0), grad_aux_RA * (aux_values_RA > 0)], 1)
        grad_RS = grad_RS.to(weight_LD.dtype)
        # With AuxK's selections beside them the ids differ from the decoder's, whose order is then not shared.
        ids_RS, order = ids_RK, ctx.order
        if aux_ids_RA.shape[1]:
            ids_RS, order = torch.cat([ids_RK, aux_ids_RA], 1), SharedLatentOrder()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(ids_RS, weight_LD, mode="sum", per_sample_weights=grad_RS).to(x_RD.dtype)
        if ctx.needs_input_grad[1]:
            grad_w, beta = ctx.compute.weight_grad(ctx.weight, ctx.in_place)
            scatter_outer_(grad_w.view_as(weight_LD), order.of(ids_RS, weight_LD.shape[0]), grad_RS, x_RD, beta)
            grad_w = None if ctx.in_place else grad_w
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = weight_LD.new_zeros(weight_LD.shape[0]).index_add_(0, ids_RS.flatten(), grad_RS.flatten())
            grad_b = grad_b.view(weight_NMD.shape[:2])
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class SparseDecoder(torch.autograd.Function):
    """sum_j values[r, j] * W_dec[ids[r, j]] -> [R, d], reading only the selected decoder rows; sparse backward."""

    @staticmethod
    def forward(ctx, values_RK, ids_RK, w_dec_NMD, order, compute):
        ctx.save_for_backward(values_RK, ids_RK, w_dec_NMD)
        ctx.weight, ctx.order = w_dec_NMD, order
        ctx.compute, ctx.in_place = compute, compute.in_place
        return weighted_row_sum(values_RK, ids_RK, w_dec_NMD)

    @staticmethod
    def backward(ctx, grad_RD):
        values_RK, ids_RK, weight_NMD = ctx.saved_tensors
        weight_LD = weight_NMD.flatten(0, 1)
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            layout = ctx.order.of(ids_RK, weight_LD.shape[0])
            grad_values = gathered_dots(layout, weight_LD, grad_RD, ids_RK.shape[1]).to(values_RK.dtype)
        if ctx.needs_input_grad[2]:
            grad_w, beta = ctx.compute.weight_grad(ctx.weight, ctx.in_place)
            layout = ctx.order.of(ids_RK, weight_LD.shape[0])
            scatter_outer_(grad_w.view_as(weight_LD), layout, values_RK.to(weight_LD.dtype), grad_RD, beta)
            grad_w = None if ctx.in_place else grad_w
        return grad_values, None, grad_w, None, None
