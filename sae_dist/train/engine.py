"""The engine: who turns a step's loss into an update (backward, gradient reduction and norm, the clipped Adam
update, the lr schedule) and holds the optimizer's state; the step (`step.py`) calls it and knows no engine.

`TorchEngine` (trainer.engine=torch) is PyTorch's: gradients reduced over ranks through the `ParallelContext`, the
project's Adam (`optim`, which keeps the decoder rows at unit norm). The DeepSpeed engine (`deepspeed_engine.py`)
implements the same interface over DeepSpeed's ZeRO optimizer.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from sae_dist.config import RunConfig
from sae_dist.parallel.context import ParallelContext
from sae_dist.train.deepspeed_engine import DeepSpeedEngine
from sae_dist.train.optim import build_optimizer, build_scheduler, clipped_adam_step


class Engine(Protocol):
    """What the step and the checkpoints ask of an engine."""

    optimizer: torch.optim.Optimizer
    """The optimizer that updates the model (dead-latent resampling resets rows of its moments)."""
    scheduler: LRScheduler
    weight_grads_in_place: bool
    """Whether the sparse kernels may write their weight gradients straight into `.grad` (SAE.in_place_weight_grads);
    False for an engine that hooks gradient accumulation."""
    graph_capturable: bool
    """Whether the step's device work may be captured as CUDA graphs (`step_graph.py`)."""

    def backward(self, loss: Tensor) -> None:
        """This rank's gradients of `loss`, replacing the previous step's."""

    def reduce_gradients(self) -> Tensor:
        """Reduce the gradients over ranks; return the global norm of the gradient (0-dim, on the device)."""

    def update(self, grad_norm: Tensor, finite: Tensor) -> float:
        """Adam on the gradients clipped by `grad_norm` to `trainer.grad_clip` (nothing changes unless `finite`),
        the decoder rows kept at unit norm, and the lr schedule's step; return the lr used."""

    def optimizer_state(self) -> torch.optim.Optimizer:
        """The optimizer state in torch Adam's per-parameter form, as checkpoints read and write it."""


class TorchEngine:
    """The PyTorch engine: the project's Adam over every parameter of `model`, reduction through `ctx`."""

    weight_grads_in_place = True
    graph_capturable = True

    def __init__(self, model: nn.Module, run: RunConfig, ctx: ParallelContext):
        self.model, self.ctx, self.max_norm = model, ctx, run.trainer.grad_clip
        self.optimizer = build_optimizer(model, run)
        self.scheduler = build_scheduler(self.optimizer, run)

    def backward(self, loss: Tensor) -> None:
        """The gradients are set to None first, which spares a zeroing pass and autograd's accumulation: the sparse
        kernels then overwrite their weights' buffers of the previous steps (`SparseCompute.weight_grad`; a fresh [M, d]
        tensor would cost a CPU more in page faults than the backward that fills it), and autograd hands over the
        other gradients as it makes them."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def reduce_gradients(self) -> Tensor:
        """Sum or average the gradients over ranks (`ParallelContext.sync_gradients`); their global norm."""
        self.ctx.sync_gradients(self.model)
        return self.ctx.grad_norm(self.model)

    def update(self, grad_norm: Tensor, finite: Tensor) -> float:
        lr = self.scheduler.get_last_lr()[0]
        clipped_adam_step(self.optimizer, grad_norm, self.max_norm, finite)
        self.scheduler.step()
        return lr

    def optimizer_state(self) -> torch.optim.Optimizer:
        return self.optimizer


def build_engine(run: RunConfig, model: nn.Module, ctx: ParallelContext, device: torch.device) -> Engine:
    """The engine of `trainer.engine`: PyTorch's, or DeepSpeed's (which imports DeepSpeed only then)."""
    if run.trainer.engine == "deepspeed":
        return DeepSpeedEngine(model, run, ctx, device)
    return TorchEngine(model, run, ctx)
