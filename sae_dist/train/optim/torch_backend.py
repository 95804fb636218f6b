"""Adam with unit-norm decoder rows in PyTorch operators: the backend of a CPU (its row passes also serve the
DeepSpeed engine).

The decoder-norm constraint is two passes around the update, written once here: before it, each row's gradient
loses its component along the row (`project_rows_`, the tangent-space projection that keeps Adam from growing the
norms; rows are unit norm on entry, so no norm is recomputed), after it each row is scaled back to unit norm
(`normalize_rows_`). Both work in place with no temporary of the weight's size: the projection as row-batched dot
products and one fused multiply-subtract (`row_dots`, `remove_row_components_`: the DeepSpeed engine calls the two
halves on its gradient partitions, summing the dot products of a row split between ranks in between).

The optimizer, `TorchAdam`, is torch's Adam with float32 moments (exact; torch's fused kernel) or with its moments
stored in bfloat16 (trainer.optimizer_state=bfloat16): 20 bytes per element moved instead of 28 and half the state
memory. That update is computed in float32 from the stored moments; only the stored moments are rounded (to
nearest), so it is not exact Adam: bfloat16 keeps 8 significant bits, so a second moment's decay by beta2 = 0.999
per step (0.1%) is below its resolution (0.4%), and the second moment of a latent that stops firing stays where it
was instead of decaying. It runs in eager chunks, so it saves memory rather than time.

It takes the clip factor and the skip of a non-finite step through the `grad_scale` (gradients are divided by it)
and `found_inf` (> 0: no change at all, step count and rows included) attributes that GradScaler uses
(`optim.clip_and_skip`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

ROW_NORM_FLOOR = 1e-12
"""The smallest row norm divided by when renormalising."""

_CHUNK = 1 << 20
"""Elements per chunk of the bfloat16-moment update, bounding its float32 temporaries."""


def row_dots(w: Tensor, grad: Tensor) -> Tensor:
    """Each row's (last dim) gradient dotted with the row: [rows, 1, 1]."""
    d = w.shape[-1]
    return torch.bmm(grad.view(-1, 1, d), w.view(-1, 1, d).transpose(1, 2))


def remove_row_components_(grad: Tensor, dots_R11: Tensor, w: Tensor) -> None:
    """grad <- grad - dots * w, row by row (in place; `dots_R11` as `row_dots` returns them)."""
    d = w.shape[-1]
    grad.view(-1, 1, d).addcmul_(dots_R11, w.view(-1, 1, d), value=-1)


@torch.no_grad()
def project_rows_(w: Tensor, grad: Tensor) -> None:
    """Remove from each row's gradient its component along the row; the rows must be unit norm."""
    remove_row_components_(grad, row_dots(w, grad), w)


@torch.no_grad()
def normalize_rows_(w: Tensor, apply: Tensor | None = None) -> None:
    """Scale each row (last dim) to unit norm; unchanged where `apply` (0-dim bool) is False."""
    apply = torch.ones((), dtype=torch.bool, device=w.device) if apply is None else apply
    scale = torch.linalg.vector_norm(w, dim=-1, keepdim=True).clamp_min(ROW_NORM_FLOOR).reciprocal()
    w.mul_(torch.where(apply, scale, 1.0))


@torch.no_grad()
def bf16_adam_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, lr: Tensor,
                      beta1: float, beta2: float, eps: float, grad_scale: Tensor, skip: Tensor) -> None:
    """One Adam update of flat tensors, in place; `step` is the step count after this update and `lr` the learning
    rate (float32, 0-dim); where `skip` (0-dim bool) nothing changes."""
    g = grad.float() / grad_scale
    m = exp_avg.float().lerp(g, 1 - beta1)
    v = exp_avg_sq.float() * beta2 + (1 - beta2) * g * g
    bias1 = 1 - torch.pow(beta1, step)
    bias2_sqrt = (1 - torch.pow(beta2, step)).sqrt()
    new_param = param - (lr / bias1) * m / (v.sqrt() / bias2_sqrt + eps)
    param.copy_(torch.where(skip, param, new_param))
    exp_avg.copy_(torch.where(skip, exp_avg, m.to(exp_avg.dtype)))
    exp_avg_sq.copy_(torch.where(skip, exp_avg_sq, v.to(exp_avg_sq.dtype)))


class TorchAdam(torch.optim.Adam):
    """Adam (no weight decay) that keeps `unit_norm_rows` (the decoder weights) at unit norm: the projection before
    the update and the renormalisation after it, unless the step is skipped. `state_dtype`: float32 moments (exact
    Adam: torch's fused kernel) or bfloat16 moments (`bf16_adam_update_`). Its state is torch Adam's."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float,
                 state_dtype: torch.dtype = torch.float32, unit_norm_rows: Iterable[Tensor] = ()):
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype={state_dtype}: float32 or bfloat16")
        super().__init__(params, lr=lr, betas=betas, eps=eps, fused=state_dtype == torch.float32)
        self.state_dtype = state_dtype
        self.unit_norm_rows = tuple(unit_norm_rows)
        self.grad_scale: Tensor | None = None
        self.found_inf: Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """One update of every parameter with a gradient (`closure` is not supported)."""
        for w in self.unit_norm_rows:
            if w.grad is not None:
                project_rows_(w.detach(), w.grad)
        if self.state_dtype == torch.float32:
            super().step()  # the fused kernel reads grad_scale and found_inf
        else:
            self._bf16_step()
        apply = None if self.found_inf is None else self.found_inf <= 0
        for w in self.unit_norm_rows:
            normalize_rows_(w.detach(), apply)

    def _bf16_step(self) -> None:
        device = self.param_groups[0]["params"][0].device
        grad_scale = self.grad_scale if self.grad_scale is not None else torch.ones((), device=device)
        skip = self.found_inf > 0 if self.found_inf is not None else torch.zeros((), dtype=torch.bool, device=device)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = torch.full((), group["lr"], device=device)  # a fill, not a host-to-device copy
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.bfloat16)
                state["step"] += (~skip).float()
                flat = [param.view(-1), param.grad.view(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)]
                for start in range(0, flat[0].numel(), _CHUNK):
                    bf16_adam_update_(*[t[start : start + _CHUNK] for t in flat], state["step"], lr, beta1, beta2,
                                      group["eps"], grad_scale, skip)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts loaded floating-point state to the parameters' dtype; the moments go back to `state_dtype`."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.state_dtype)
