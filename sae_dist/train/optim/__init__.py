"""The optimisation recipe (SPEC section 4): Adam that keeps the decoder rows at unit norm, the lr rule and
schedule, and clipping.

One optimizer, two backends: each keeps `model.decoder_weights()` at unit norm inside its `step()` (the gradient's
component along each row removed before the update, the rows renormalised after it) and takes the clip factor and
the skip of a non-finite step from `clip_and_skip`, so the training step never touches the rows itself.
- `triton_backend.TritonAdam` where the parameters are on a GPU: one kernel per parameter, the decoder's
  projection, update and renormalisation in one pass;
- `torch_backend.TorchAdam` elsewhere: torch's fused Adam, or its own update for bfloat16 moments, between the
  projection and renormalisation passes.
Both take `state_dtype` (float32: exact Adam; bfloat16 moments) and save torch Adam's state dict. An engine's own
parameter groups (DeepSpeed's flat partitions) get torch's fused Adam without the row constraint; that engine applies
the torch backend's projection and renormalisation to its rows itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from sae_dist.config import RunConfig
from sae_dist.models.base import default_lr
from sae_dist.train.optim.torch_backend import TorchAdam

try:  # Triton comes with torch's CUDA wheels; a CPU install may have none.
    from sae_dist.train.optim.triton_backend import TritonAdam
except ImportError:
    TritonAdam = None

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
    adam = TritonAdam if TritonAdam is not None and on_gpu else TorchAdam
    return adam(model.parameters(), lr=lr, betas=betas, eps=eps, state_dtype=state_dtype,
                unit_norm_rows=model.decoder_weights())


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
