"""Adam with its moments stored in bfloat16: the lower-precision optimizer-state option (trainer.optimizer_state).

Fused float32 Adam reads a parameter, its gradient and both moments and writes the parameter and the moments: 28
bytes per element, which at M = 2^20 latents is most of a GPU step. With the moments in bfloat16 it is 20 bytes
and the optimizer state takes half the memory. The update is computed in float32 from the stored moments; only the
stored moments are rounded (to nearest), so it is not exact Adam: bfloat16 keeps 8 significant bits, so a second
moment's decay by beta2 = 0.999 per step (0.1%) is below its resolution (0.4%), and the second moment of a latent
that stops firing stays where it was instead of decaying.

On a GPU each parameter's update is one `torch.compile`d kernel (a single pass, as the fused optimizer makes); on a
CPU it runs eagerly in chunks and is slower than fused float32 Adam, so there it only saves memory. The step
takes the same `grad_scale` (gradients are divided by it: clipping) and `found_inf` (1: no update at all, the step
count included) as the trainer's fused Adam.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_dist.train.compiled import on_device

_CPU_CHUNK = 1 << 20
"""Elements per eager chunk on a CPU, bounding the float32 temporaries."""


def adam_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    lr: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    grad_scale: Tensor,
    skip: Tensor,
) -> None:
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


class BF16StateAdam(torch.optim.Optimizer):
    """Adam (no weight decay) with bfloat16 moments; float32 parameters and arithmetic."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.grad_scale: Tensor | None = None
        self.found_inf: Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """One update of every parameter with a gradient (`closure` is not supported: torch's signature)."""
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
                scalars = (state["step"], lr, beta1, beta2, group["eps"], grad_scale, skip)
                # One kernel per parameter on a GPU (the lr is a tensor, so no value recompiles it); on a CPU
                # eager chunks bound the float32 temporaries.
                chunk = max(flat[0].numel(), 1) if param.is_cuda else _CPU_CHUNK
                for start in range(0, flat[0].numel(), chunk):
                    on_device(adam_update_, *[t[start : start + chunk] for t in flat], *scalars)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts loaded floating-point state to the parameters' dtype; the moments go back to bfloat16."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)
