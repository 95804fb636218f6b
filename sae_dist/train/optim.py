"""The optimisation recipe (SPEC section 4): Adam, the lr rule and schedule, and the decoder-norm constraint."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from sae_dist.config import RunConfig, default_lr


def build_optimizer(model: nn.Module, run: RunConfig, param_groups: list[dict] | None = None) -> torch.optim.Adam:
    """Adam (no weight decay) at the configured lr or the paper's 2e-4 / sqrt(M / 2^14) rule, over `param_groups`
    (default: one group of every parameter of `model`)."""
    lr = run.trainer.lr if run.trainer.lr is not None else default_lr(run.sae)
    betas = tuple(run.trainer.adam_betas)
    return torch.optim.Adam(param_groups or model.parameters(), lr=lr, betas=betas, eps=run.trainer.adam_eps)


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


@torch.no_grad()
def normalize_decoder_(w_dec: Tensor) -> None:
    """Scale each decoder row (last dim) to unit norm."""
    w_dec.div_(w_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def remove_parallel_gradient_(w_dec: nn.Parameter) -> None:
    """Remove from each decoder row's gradient its component along that (unit-norm) row.

    With unit-norm rows this is the tangent-space projection that keeps Adam from growing the norms.
    """
    if w_dec.grad is None:
        return
    rows = w_dec / w_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    parallel = (w_dec.grad * rows).sum(dim=-1, keepdim=True)
    w_dec.grad.sub_(parallel * rows)
