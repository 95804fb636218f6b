"""Adam with unit-norm decoder rows as Triton kernels: the backend of a GPU (`TritonAdam`).

The update of a parameter is one kernel that reads the parameter, its gradient and both moments once and writes the
parameter and the moments once (fp32 moments: 28 bytes per element, bf16 moments: 20). Decoder weights get a
row-wise kernel that does the decoder-norm constraint's passes in that same pass: the gradient projection
g <- g - (g.w) w (rows are unit norm on entry), the Adam update, then the renormalisation w <- w / max(||w||, 1e-12).
It takes decoders whose rows one program holds (`MAX_ROW_WIDTH`); wider ones train on the torch backend
(`optim.build_optimizer`).

Everything per step comes from device tensors, so a step never reads the device back to the host, a changing lr
compiles nothing, and a captured CUDA graph replays correctly: the step count (`state["step"]`, float32, as torch's
fused Adam keeps it), the lr (a 0-dim tensor in the param group, which LR schedulers fill in place; a float lr is
copied into a per-group device tensor at each step, which a CUDA graph would record as a constant), the clip factor
`grad_scale` (gradients are divided by it) and `found_inf` (> 0: no change at all, step count included), set by
`optim.clip_and_skip` as for torch's fused Adam.

The arithmetic is torch's Adam (no weight decay) in float32, with the GPU's fast division and square root (within
2 ulp; the IEEE ones made the row kernel markedly slower); the bias corrections are computed in float64 from the
float32 step count, as torch's non-capturable Adam computes them in Python floats. Moments are stored in float32 or
bfloat16 (rounded to nearest, as `optim.bf16_adam_update_` rounds them). A program updates 1024 elements
(8 per thread at 4 warps: two 128-bit loads per float32 tensor), or whole rows: sizes at which both kernels move
their bytes at about the speed of a copy (docs/performance.md).

On a CPU the kernels run only under Triton's interpreter (TRITON_INTERPRET=1 before this module is imported), which
the tests use; training on a CPU keeps the torch backend (`optim.build_optimizer`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import triton
import triton.language as tl
from torch import Tensor


ELEMENTS_PER_PROGRAM = 1024
"""Elements one program updates per tensor; the row kernel takes as many whole rows as fit, at least one."""
ELEMENTS_PER_THREAD = 8
"""Elements per thread and tensor, which sets the warps per program (4 for 1024 elements)."""

MAX_ROW_WIDTH = 8192
"""The widest rows the row kernel holds in one program; a decoder of wider rows trains on the torch backend."""

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")

TORCH_ADAM_GROUP = {"weight_decay": 0.0, "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                    "differentiable": False, "fused": True, "decoupled_weight_decay": False}
"""What torch.optim.Adam's param groups hold beyond lr, betas and eps: added to `state_dict()` so that a fused torch
Adam loads it as its own."""


@triton.jit
def _adam(p, g, m, v, step_ptr, lr_ptr, beta1, one_minus_beta1, beta2, one_minus_beta2, log2_beta1, log2_beta2, eps):
    """torch's Adam update of float32 values (g already clipped): the new (p, m, v)."""
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    step = tl.load(step_ptr).to(tl.float64)
    bias1 = (1 - tl.exp2(step * log2_beta1)).to(tl.float32)
    bias2_sqrt = tl.sqrt(1 - tl.exp2(step * log2_beta2)).to(tl.float32)
    step_size = tl.load(lr_ptr).to(tl.float32) / bias1
    denom = tl.sqrt(v) / bias2_sqrt + eps
    return p - step_size * (m / denom), m, v


@triton.jit
def _stored(x, ptr):
    """Float32 `x` in the element type of `ptr`: bfloat16 rounded to nearest even by hand (as a GPU rounds, and
    torch; Triton's interpreter would truncate), other types by conversion."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ptr.dtype.element_ty)


@triton.jit
def _adam_flat_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, numel, step_ptr, lr_ptr, grad_scale_ptr,
                      found_inf_ptr, beta1, one_minus_beta1, beta2, one_minus_beta2, log2_beta1, log2_beta2, eps,
                      BLOCK: tl.constexpr):
    if tl.load(found_inf_ptr) <= 0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = g / tl.load(grad_scale_ptr).to(tl.float32)
        p, m, v = _adam(p, g, m, v, step_ptr, lr_ptr, beta1, one_minus_beta1, beta2, one_minus_beta2, log2_beta1,
                        log2_beta2, eps)
        tl.store(param_ptr + offs, _stored(p, param_ptr), mask=mask)
        tl.store(exp_avg_ptr + offs, _stored(m, exp_avg_ptr), mask=mask)
        tl.store(exp_avg_sq_ptr + offs, _stored(v, exp_avg_sq_ptr), mask=mask)


@triton.jit
def _adam_unit_rows_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, num_rows, width, step_ptr, lr_ptr,
                           grad_scale_ptr, found_inf_ptr, beta1, one_minus_beta1, beta2, one_minus_beta2, log2_beta1,
                           log2_beta2, eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    if tl.load(found_inf_ptr) <= 0:
        rows_R = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols_D = tl.arange(0, BLOCK_D)
        mask = (rows_R < num_rows)[:, None] & (cols_D < width)[None, :]
        offs = rows_R[:, None] * width + cols_D[None, :]
        w = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # Projecting before the clip equals projecting after it: both are linear.
        g = g - tl.sum(g * w, axis=1)[:, None] * w
        g = g / tl.load(grad_scale_ptr).to(tl.float32)
        w, m, v = _adam(w, g, m, v, step_ptr, lr_ptr, beta1, one_minus_beta1, beta2, one_minus_beta2, log2_beta1,
                        log2_beta2, eps)
        norm_R = tl.sqrt(tl.sum(w * w, axis=1))
        w = w * (1.0 / tl.maximum(norm_R, 1e-12))[:, None]
        tl.store(param_ptr + offs, _stored(w, param_ptr), mask=mask)
        tl.store(exp_avg_ptr + offs, _stored(m, exp_avg_ptr), mask=mask)
        tl.store(exp_avg_sq_ptr + offs, _stored(v, exp_avg_sq_ptr), mask=mask)


def _constants(betas: tuple[float, float], eps: float) -> tuple[float, ...]:
    """The kernels' float arguments, derived in float64 on the host (a zero beta's powers are all 0)."""
    beta1, beta2 = betas
    log2 = [math.log2(b) if b > 0 else -math.inf for b in betas]
    return beta1, 1 - beta1, beta2, 1 - beta2, log2[0], log2[1], eps


def adam_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, lr: Tensor,
                 grad_scale: Tensor, found_inf: Tensor, betas: tuple[float, float], eps: float) -> None:
    """One Adam update of contiguous tensors of any shape, in place, unless `found_inf` > 0: the gradient divided by
    `grad_scale`; `step` is the step count after this update, `lr` the learning rate (0-dim, on the device)."""
    numel = param.numel()
    _adam_flat_kernel[(triton.cdiv(numel, ELEMENTS_PER_PROGRAM),)](
        param, grad, exp_avg, exp_avg_sq, numel, step, lr, grad_scale, found_inf, *_constants(betas, eps),
        BLOCK=ELEMENTS_PER_PROGRAM, num_warps=ELEMENTS_PER_PROGRAM // (32 * ELEMENTS_PER_THREAD),
    )


def adam_update_unit_rows_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor,
                           lr: Tensor, grad_scale: Tensor, found_inf: Tensor, betas: tuple[float, float],
                           eps: float) -> None:
    """`adam_update_` of a weight whose rows (last dim, at most MAX_ROW_WIDTH wide; unit norm on entry) stay unit
    norm: the gradient's component along each row is removed first and each updated row is scaled to unit norm."""
    width = param.shape[-1]
    num_rows = param.numel() // max(width, 1)
    block_d = triton.next_power_of_2(width)
    tile = max(ELEMENTS_PER_PROGRAM, block_d)
    rows = tile // block_d
    _adam_unit_rows_kernel[(triton.cdiv(num_rows, rows),)](
        param, grad, exp_avg, exp_avg_sq, num_rows, width, step, lr, grad_scale, found_inf, *_constants(betas, eps),
        ROWS=rows, BLOCK_D=block_d, num_warps=tile // (32 * ELEMENTS_PER_THREAD),
    )


class TritonAdam(torch.optim.Optimizer):
    """Adam (no weight decay) as one Triton kernel per parameter; `unit_norm_rows`: the weights (decoders) whose
    rows it keeps at unit norm (projected gradient, renormalised rows). `state_dtype`: float32 (exact Adam) or
    bfloat16 moments.

    Its state dict is torch Adam's (`step`, `exp_avg`, `exp_avg_sq`, the param groups of a fused torch Adam), and it
    loads torch Adam's."""

    def __init__(self, params, lr: float | Tensor, betas: tuple[float, float], eps: float,
                 state_dtype: torch.dtype = torch.float32, unit_norm_rows: Iterable[Tensor] = ()):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})
        self.state_dtype = state_dtype
        self.unit_norm_rows = tuple(unit_norm_rows)
        if not self.keeps_rows_of(self.unit_norm_rows):
            raise ValueError(f"TritonAdam keeps rows of at most {MAX_ROW_WIDTH} elements at unit norm, not "
                             f"{max(w.shape[-1] for w in self.unit_norm_rows)}")
        self.grad_scale: Tensor | None = None
        self.found_inf: Tensor | None = None
        self._lr_buffers: dict[int, Tensor] = {}
        """Per param group, the device tensor a float lr is copied into at each step."""

    @staticmethod
    def keeps_rows_of(weights: Iterable[Tensor]) -> bool:
        """Whether the row kernel holds every row of `weights`."""
        return all(w.shape[-1] <= MAX_ROW_WIDTH for w in weights)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """One update of every parameter with a gradient (`closure` is not supported: torch's signature)."""
        live = [(i, p) for i, group in enumerate(self.param_groups) for p in group["params"] if p.grad is not None]
        if not live:
            return
        device = live[0][1].device
        grad_scale = self.grad_scale if self.grad_scale is not None else torch.ones((), device=device)
        found_inf = self.found_inf if self.found_inf is not None else torch.zeros((), device=device)
        for _, param in live:
            if not self.state[param]:
                self.state[param].update(self._zero_state(param))
        steps = [self.state[p]["step"] for _, p in live]
        # One list per operand: with a 0-dim tensor as the scalar, _foreach_add_ reads it back to the host.
        torch._foreach_add_(steps, [(found_inf <= 0).float()] * len(steps))
        lrs = {i: self._lr_on_device(i, device) for i in {i for i, _ in live}}
        unit_norm_rows = set(self.unit_norm_rows)
        for i, param in live:
            group, state = self.param_groups[i], self.state[param]
            update = adam_update_unit_rows_ if param in unit_norm_rows else adam_update_
            update(param.detach(), param.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], lrs[i],
                   grad_scale, found_inf, group["betas"], group["eps"])

    def _zero_state(self, param: Tensor) -> dict[str, Tensor]:
        if not (param.is_contiguous() and param.grad.is_contiguous()):
            raise ValueError(f"TritonAdam updates contiguous parameters and gradients, not a {tuple(param.shape)} "
                             f"one of strides {param.stride()} / {param.grad.stride()}")
        state = {"step": torch.zeros((), dtype=torch.float32, device=param.device)}
        state.update({key: torch.zeros_like(param, dtype=self.state_dtype) for key in MOMENT_KEYS})
        return state

    def _lr_on_device(self, group_index: int, device: torch.device) -> Tensor:
        lr = self.param_groups[group_index]["lr"]
        if isinstance(lr, Tensor) and lr.device == device:
            return lr
        buffer = self._lr_buffers.get(group_index)
        if buffer is None:
            buffer = self._lr_buffers[group_index] = torch.zeros((), dtype=torch.float32, device=device)
        return buffer.fill_(lr)  # a kernel argument, not a host-to-device copy

    def state_dict(self) -> dict:
        state_dict = super().state_dict()
        state_dict["param_groups"] = [{**TORCH_ADAM_GROUP, **group} for group in state_dict["param_groups"]]
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """torch keeps a loaded step count where it was saved and casts moments to the parameters' dtype: here the
        step count goes to the parameter's device (float32) and the moments to `state_dtype`."""
        super().load_state_dict(state_dict)
        for param, state in self.state.items():
            if "step" in state:
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)
            for key in MOMENT_KEYS:
                if key in state:
                    state[key] = state[key].to(self.state_dtype)
