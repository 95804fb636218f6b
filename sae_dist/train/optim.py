"""The optimisation recipe (docs/math.md section 4): Adam that keeps the decoder rows at unit norm, the lr rule and
schedule, and clipping; Adam's PyTorch backend.

One optimizer, two backends: each keeps `model.decoder_weights()` at unit norm inside its `step()` (the gradient's
component along each row removed before the update, the rows renormalised after it) and takes the clip factor and
the skip of a non-finite step from `clip_and_skip`, so the training step never touches the rows itself.
- `triton_adam.TritonAdam` where the parameters are on a GPU and the rows fit its row kernel: one kernel per
  parameter, the decoder's projection, update and renormalisation in one pass;
- `TorchAdam` (here) elsewhere: torch's fused Adam, or its own update for bfloat16 moments, between the projection
  and renormalisation passes.
Both take `state_dtype` (float32: exact Adam; bfloat16 moments) and save torch Adam's state dict. An engine's own
parameter groups (DeepSpeed's flat partitions) get torch's fused Adam without the row constraint; that engine applies
this module's projection and renormalisation to its rows itself.

The decoder-norm constraint is two passes around the update, written once here: before it, each row's gradient
loses its component along the row (`project_rows_`, the tangent-space projection that keeps Adam from growing the
norms; rows are unit norm on entry, so no norm is recomputed), after it each row is scaled back to unit norm
(`normalize_rows_`). Both work in place with no temporary of the weight's size: the projection as row-batched dot
products and one fused multiply-subtract (`row_dots`, `remove_row_components_`: the DeepSpeed engine calls the two
halves on its gradient partitions, summing the dot products of a row split between ranks in between).

`TorchAdam` is torch's Adam with float32 moments (exact; torch's fused kernel) or with its moments stored in
bfloat16 (trainer.optimizer_state=bfloat16): 20 bytes per element moved instead of 28 and half the state memory.
That update is computed in float32 from the stored moments; only the stored moments are rounded (to nearest), so it
is not exact Adam: bfloat16 keeps 8 significant bits, so a second moment's decay by beta2 = 0.999 per step (0.1%) is
below its resolution (0.4%), and the second moment of a latent that stops firing stays where it was instead of
decaying. It runs in eager chunks, so it saves memory rather than time. It takes the clip factor and the skip of a
non-finite step through the `grad_scale` (gradients are divided by it) and `found_inf` (> 0: no change at all, step
count and rows included) attributes that GradScaler uses (`clip_and_skip`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from sae_dist.config import RunConfig
from sae_dist.models.base import default_lr

try:  # Triton comes with torch's CUDA wheels; a CPU install may have none.
    from sae_dist.train.triton_adam import TritonAdam
except ImportError:
    TritonAdam = None


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


CLIP_EPS = 1e-6
"""Added to the gradient norm before dividing by it, as `torch.nn.utils.clip_grad_norm_` does."""


def build_optimizer(model: nn.Module, run: RunConfig, param_groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """Adam (no weight decay) at the configured lr or the rule of `trainer.lr_rule`, exact or with bfloat16 moments
    (`trainer.optimizer_state`), keeping `model.decoder_weights()` at unit norm.

    `param_groups`: an engine's own groups (DeepSpeed's), which get torch's fused Adam without the row constraint
    (the engine applies it; bfloat16 moments are refused there at validation); default: one group of every
    parameter of `model`, on the Triton backend when they are on a GPU and Triton imports."""
    lr = run.trainer.lr if run.trainer.lr is not None else default_lr(run.sae, run.trainer.lr_rule)
    betas = tuple(run.trainer.adam_betas)
    eps = run.trainer.adam_eps
    if param_groups is not None:  # torch's own class: DeepSpeed's ZeRO takes the optimizers it was tested with only
        return torch.optim.Adam(param_groups, lr=lr, betas=betas, eps=eps, fused=True)
    state_dtype = torch.bfloat16 if run.trainer.optimizer_state == "bfloat16" else torch.float32
    on_gpu = all(p.is_cuda for p in model.parameters())
    rows = model.decoder_weights()
    adam = TritonAdam if TritonAdam is not None and on_gpu and TritonAdam.keeps_rows_of(rows) else TorchAdam
    return adam(model.parameters(), lr=lr, betas=betas, eps=eps, state_dtype=state_dtype,
                unit_norm_rows=rows)


def clip_and_skip(adam: torch.optim.Optimizer, grad_norm: Tensor, max_norm: float, apply: Tensor) -> None:
    """Make `adam`'s next step clip the gradients to global norm `max_norm` and change nothing unless `apply`.

    Clipping multiplies every gradient by min(1, max_norm / (norm + 1e-6)); each backend divides them by the inverse
    (`grad_scale`) inside its own pass. Where `apply` (0-dim bool) is False, parameters, moments, step counts and
    rows stay as they were (`found_inf`). Nothing is read back to the host."""
    adam.grad_scale = ((grad_norm.float() + CLIP_EPS) / max_norm).clamp_min(1.0)
    adam.found_inf = (~apply).float()


def clipped_adam_step(adam: torch.optim.Optimizer, grad_norm: Tensor, max_norm: float, apply: Tensor) -> None:
    """One step of `adam` on the gradients clipped to global norm `max_norm`; no update at all unless `apply`."""
    clip_and_skip(adam, grad_norm, max_norm, apply)
    adam.step()


def lr_multiplier(step: int, total_steps: int, decay_frac: float) -> float:
    """1 until the last `decay_frac` of the steps, then linear decay reaching 0 at `total_steps`."""
    decay_steps = int(total_steps * decay_frac)
    decay_start = total_steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return 1.0
    return max(0.0, (total_steps - step) / decay_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, run: RunConfig, kind: type[LambdaLR] = LambdaLR
) -> LambdaLR:
    """The schedule of `lr_multiplier` as a `kind` (a LambdaLR or a subclass)."""
    steps, frac = run.trainer.steps, run.trainer.lr_decay_frac
    return kind(optimizer, lambda step: lr_multiplier(step, steps, frac))
