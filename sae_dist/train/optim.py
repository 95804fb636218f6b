"""The optimisation recipe (SPEC section 4): Adam, the lr rule and schedule, clipping and the decoder-norm constraint.

Each piece makes as few passes over the parameters as it can, with no temporary of their size. On a GPU, Adam is
`triton_adam.TritonAdam`: one kernel per parameter, which also applies the clip factor and skips a non-finite step,
and for the decoder weights also projects the gradient and renormalises the rows in that same pass. Elsewhere (a
CPU, or an engine's own parameter groups) it is torch's fused Adam (or `bf16_adam.BF16StateAdam`), which takes the
clip factor and the skip through the `grad_scale` / `found_inf` arguments that GradScaler uses, beside separate
decoder renormalisation and gradient projection passes (one compiled row-reduction kernel each on a GPU,
`compiled.py`; in eager PyTorch a row-norm pass and a scaling pass, and row-batched dot products then one fused
multiply-subtract).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from sae_dist.config import RunConfig
from sae_dist.models.base import default_lr
from sae_dist.train.bf16_adam import BF16StateAdam
from sae_dist.train.compiled import on_device

CLIP_EPS = 1e-6
"""Added to the gradient norm before dividing by it, as `torch.nn.utils.clip_grad_norm_` does."""


def build_optimizer(model: nn.Module, run: RunConfig, param_groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """Adam (no weight decay) at the configured lr or the rule of `trainer.lr_rule` over `param_groups`
    (default: one group of every parameter of `model`): exact, or with bfloat16 moments (`trainer.optimizer_state`).

    `TritonAdam` (which also keeps `model.decoder_weights()` at unit norm) when the parameters are on a GPU, Triton
    imports and no `param_groups` are given; torch's fused Adam or BF16StateAdam otherwise (an engine's own groups,
    DeepSpeed's, get these)."""
    lr = run.trainer.lr if run.trainer.lr is not None else default_lr(run.sae, run.trainer.lr_rule)
    betas = tuple(run.trainer.adam_betas)
    bf16_state = run.trainer.optimizer_state == "bfloat16"
    triton_adam = _triton_adam() if param_groups is None and all(p.is_cuda for p in model.parameters()) else None
    if triton_adam is not None:
        return triton_adam(model.parameters(), lr=lr, betas=betas, eps=run.trainer.adam_eps,
                           state_dtype=torch.bfloat16 if bf16_state else torch.float32,
                           unit_norm_rows=model.decoder_weights())
    params = param_groups or model.parameters()
    if bf16_state:
        return BF16StateAdam(params, lr=lr, betas=betas, eps=run.trainer.adam_eps)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=run.trainer.adam_eps, fused=True)


def _triton_adam() -> type[torch.optim.Optimizer] | None:
    try:  # Triton comes with torch's CUDA wheels; a CPU install has none.
        from sae_dist.train.triton_adam import TritonAdam
    except ImportError:
        return None
    return TritonAdam


def optimizer_keeps_unit_rows(optimizer: torch.optim.Optimizer, w_dec: Tensor) -> bool:
    """Whether `optimizer`'s update itself projects `w_dec`'s gradient and renormalises its rows (TritonAdam's
    `unit_norm_rows`), so that the training step must not."""
    return w_dec in getattr(optimizer, "unit_norm_rows", ())


def clipped_adam_step(optimizer: torch.optim.Optimizer, grad_norm: Tensor, max_norm: float, apply: Tensor) -> None:
    """One Adam step on the gradients clipped to global norm `max_norm`; no update at all unless `apply`.

    Clipping multiplies every gradient by min(1, max_norm / (norm + 1e-6)); fused Adam divides them by the inverse
    (`grad_scale`) inside its own pass. Where `apply` (0-dim bool) is False, fused Adam leaves parameters, moments
    and step counts as they were (`found_inf`). Nothing is read back to the host.
    """
    clip_and_skip_in_adam(optimizer, grad_norm, max_norm, apply)
    optimizer.step()


def clip_and_skip_in_adam(adam: torch.optim.Optimizer, grad_norm: Tensor, max_norm: float, apply: Tensor) -> None:
    """Make `adam`'s next step (fused Adam, BF16StateAdam or TritonAdam) clip by `grad_norm` and skip unless
    `apply`."""
    adam.grad_scale = ((grad_norm.float() + CLIP_EPS) / max_norm).clamp_min(1.0)
    adam.found_inf = (~apply).float()


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


def _normalize_rows_(w: Tensor, apply: Tensor) -> None:
    scale = torch.linalg.vector_norm(w, dim=-1, keepdim=True).clamp_min(1e-12).reciprocal()
    w.mul_(torch.where(apply, scale, 1.0))


def _project_rows_(w: Tensor, grad: Tensor) -> None:
    # Eager: row-batched dot products and an in-place update, no temporary of the weight's size. (`baddbmm_` for
    # the update took 4.8 ms against addcmul_'s 0.5 at [6144, 384] on a CPU, and 77 against 8 ms at [65536, 384].)
    rows_L1D, grads_L1D = w.view(-1, 1, w.shape[-1]), grad.view(-1, 1, w.shape[-1])
    parallel_L11 = torch.bmm(grads_L1D, rows_L1D.transpose(1, 2))
    grads_L1D.addcmul_(parallel_L11, rows_L1D, value=-1)


def _project_rows_pointwise_(w: Tensor, grad: Tensor) -> None:
    # For the compiler: one row-reduction kernel that reads each row once. (The bmm form above stays two cuBLAS
    # calls when compiled, and cuBLAS's K = 1 batched GEMM took 29 of a 73 ms H200 step at M = 2^20.)
    grad.sub_((grad * w).sum(-1, keepdim=True) * w)


@torch.no_grad()
def normalize_decoder_(w_dec: Tensor, apply: Tensor | None = None) -> None:
    """Scale each decoder row (last dim) to unit norm; unchanged where `apply` (0-dim bool) is False."""
    apply = torch.ones((), dtype=torch.bool, device=w_dec.device) if apply is None else apply
    on_device(_normalize_rows_, w_dec.detach(), apply)


@torch.no_grad()
def remove_parallel_gradient_(w_dec: nn.Parameter) -> None:
    """Remove from each decoder row's gradient its component along that row; the rows must be unit norm.

    This is the tangent-space projection that keeps Adam from growing the norms. The training step keeps the rows
    unit norm (it renormalises after every update), so no norm is recomputed here.
    """
    if w_dec.grad is not None:
        on_device(_project_rows_pointwise_ if w_dec.is_cuda else _project_rows_, w_dec.detach(), w_dec.grad)
