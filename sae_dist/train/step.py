"""One training step (docs/math.md section 4): forward and loss, backward, gradient reduction and norm, the clipped Adam
update that keeps the decoder rows at unit norm, then the device work after it (dead-latent counters, the model's
after-step state) and, on its schedule, dead-latent resampling.

The step owns no file and no loop state: it is built from a model, an engine (`engine.py`) and the latent
bookkeeping, and called with the batch and the run's progress, so a benchmark builds it without a run folder.
The decoder rows are renormalised after each update (the start state is unit norm), which is the spec's
renormalise-then-forward order shifted by half a step, so a skipped step changes nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_map_only

from sae_dist.config import RunConfig, resolve_dtype
from sae_dist.models import SAE, SAEOutput, architecture, build_sae
from sae_dist.models.auxk import AuxCandidates
from sae_dist.models.losses import total_loss
from sae_dist.parallel.context import ParallelContext
from sae_dist.train.engine import Engine, build_engine
from sae_dist.train.latents import LatentBookkeeping
from sae_dist.train.step_graph import StepGraphs

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class BeforeUpdate(NamedTuple):
    """The step up to the update (what the first CUDA graph computes)."""

    out: SAEOutput
    terms: dict[str, Tensor]
    """Unweighted loss terms, 0-dim each."""
    loss: Tensor
    grad_norm: Tensor
    """Global norm of the reduced, unclipped gradient, 0-dim."""
    finite: Tensor
    """0-dim bool: False when the batch, the loss or the gradient norm was not finite (then nothing was updated)."""


class StepResult(NamedTuple):
    """One step's results; every tensor detached. Under CUDA graphs out, terms, loss and grad_norm are the graph's
    outputs, valid until the next step."""

    out: SAEOutput
    terms: dict[str, Tensor]
    loss: Tensor
    grad_norm: Tensor
    lr: float
    """The learning rate of this step's update."""
    finite: Tensor


def graphs_apply(run: RunConfig, device: torch.device, ctx: ParallelContext, engine: Engine) -> bool:
    """Whether the step replays CUDA graphs: trainer.cuda_graph on one GPU, outside torchrun (whose collectives read
    split sizes back to the host), with an engine whose update may be captured."""
    return run.trainer.cuda_graph and device.type == "cuda" and not ctx.distributed and engine.graph_capturable


class TrainStep:
    """The training step of `model` on `engine`; `graphs`: replay its device work as CUDA graphs (`step_graph.py`).
    Nothing is read back to the host on one device, except at resampling steps."""

    def __init__(self, model: SAE, engine: Engine, latents: LatentBookkeeping, ctx: ParallelContext, run: RunConfig,
                 device: torch.device, graphs: bool = False):
        self.model, self.engine, self.latents, self.ctx, self.run = model, engine, latents, ctx, run
        self.autocast_dtype = AUTOCAST_DTYPES.get(resolve_dtype(run.trainer.dtype, device.type))
        self.device_type = device.type
        self.graphs = StepGraphs(self.before_update, self.after_update) if graphs else None

    def __call__(self, x_TD: Tensor, step: int, tokens: int) -> StepResult:
        """The step on this rank's batch `x_TD` (the source's rows: [x | y] for a transcoder, split by the model)
        after `step` steps and `tokens` tokens of training."""
        aux = self.latents.aux_candidates(tokens)
        weights = self.model.loss_weights(step / self.run.trainer.steps)
        graphs = self.graphs
        before = None  # None: run it eagerly
        if graphs is not None and graphs.ready(x_TD, aux, weights):
            before = graphs.before_update(x_TD, aux, weights)
        if before is not None:
            lr = self.engine.update(before.grad_norm, before.finite)
            if not graphs.after_update():
                self.after_update(before)
            before = before._replace(finite=before.finite.clone())  # the loop keeps it past the next replay
        else:
            before = self.before_update(x_TD, aux, weights)
            lr = self.engine.update(before.grad_norm, before.finite)
            self.after_update(before)
        self.latents.after_update()
        if self.latents.resample(x_TD, before.out, before.finite, step + 1, self.engine.optimizer):
            self.reset_graphs()
        return StepResult(before.out, before.terms, before.loss, before.grad_norm, lr, before.finite)

    def reset(self) -> None:
        """Forget what followed the previous steps (the parameters and counters were restored)."""
        self.latents.reset()
        self.reset_graphs()

    def reset_graphs(self) -> None:
        if self.graphs is not None:
            self.graphs.reset()

    def before_update(self, x_TD: Tensor, aux: AuxCandidates | None, weights: dict[str, float]) -> BeforeUpdate:
        """Forward, loss, backward, reduction and norm, the finite flag."""
        out, terms, loss = self.forward_loss(x_TD, aux, weights)
        self.engine.backward(loss)
        grad_norm = self.engine.reduce_gradients()
        # A non-finite batch makes L_rec (a sum over all of it) and the global gradient norm non-finite: checking
        # the two scalars covers it without a pass over the batch.
        finite = torch.isfinite(torch.stack([loss.detach().float(), grad_norm.float()])).all()
        # Detached: a result that outlives the step must not keep its autograd graph alive. That graph holds the
        # parameters' gradient accumulators, which then keep the stream they were made on; the next step's
        # backward on another stream (a CUDA graph's capture) would have to wait for it.
        out, terms = tree_map_only(torch.Tensor, torch.Tensor.detach, (out, terms))
        return BeforeUpdate(out, terms, loss.detach(), grad_norm, finite)

    def after_update(self, before: BeforeUpdate) -> None:
        """The device work after the update: dead-latent counters and the model's after-step state."""
        self.latents.track(before.out, before.finite)
        self.model.after_step(before.out, self.ctx, before.finite)

    def forward_loss(self, x_TD: Tensor, aux: AuxCandidates | None, weights: dict[str, float]
                     ) -> tuple[SAEOutput, dict[str, Tensor], Tensor]:
        """(model output, loss terms, total loss) of this rank's rows under the configured autocast: the model reads
        their inputs and its loss compares with their targets (docs/math.md section 9; the same rows for an SAE); AuxK
        (when on) over `aux`, this step's dead-latent candidates."""
        # No cast cache under graphs: cached casts would outlive the capture's autocast region.
        autocast = torch.autocast(self.device_type, dtype=self.autocast_dtype,
                                  enabled=self.autocast_dtype is not None, cache_enabled=self.graphs is None)
        with autocast, self.model.in_place_weight_grads(self.engine.weight_grads_in_place):
            inputs_TD, targets_TO = self.model.split_batch(x_TD)
            out = self.model(inputs_TD) if aux is None else self.model(inputs_TD, aux_candidates=aux)
            terms = self.model.loss_terms(targets_TO, out, self.ctx)
            loss = total_loss(terms, weights)
        return out, terms, loss


def build_step(run: RunConfig, d_model: int, ctx: ParallelContext | None = None,
               device: torch.device | str = "cpu") -> TrainStep:
    """The SAE of `run` on inputs of width `d_model` (built from trainer.seed, on `device`, sharded as `ctx`
    lays it out) with its engine, latent bookkeeping and step; no file is read or written."""
    ctx, device = ctx or ParallelContext(), torch.device(device)
    dispatcher = ctx.dispatcher(run.sae.num_experts) if architecture(run.sae.kind).routed else None
    model = build_sae(run.sae, d_model, run.trainer.seed, dispatcher).to(device)
    engine = build_engine(run, model, ctx, device)
    graphs = graphs_apply(run, device, ctx, engine)
    latents = LatentBookkeeping(model, run, ctx, device, round_width=graphs)
    return TrainStep(model, engine, latents, ctx, run, device, graphs)
