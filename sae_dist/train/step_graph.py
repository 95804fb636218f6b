"""CUDA graphs of the training step (trainer.cuda_graph): its device work captured once, then replayed.

The eager step launches some 190 operators one by one from Python; a replayed graph launches them all at once, which
shortens a step whose kernels are shorter than their launches (README, Benchmarks). The step splits
where host work has to run between device work (`step.TrainStep`):
1. before the update, a graph: forward, loss, backward, gradient norm, the finite flag;
2. the update, eager: the optimizer (with the decoder-row constraint) and the lr schedule, whose step counts and lr
   the host keeps;
3. after the update, a graph: the dead-latent counters, the model's after-step state.

A graph replays what the Python code did when it was captured: the same tensors, shapes and Python constants. So
the batch and AuxK's candidates are copied into buffers that the graph reads, and a graph's key holds what the
Python code baked in (shapes, the AuxK candidate width, the loss weights). A step whose key differs from the
captured one runs eagerly; the step after `WARMUP_STEPS` eager steps of one key (which run every lazy
initialisation and compilation) is captured. The step's results (loss, terms, output) live in the graph's memory
until the next replay. Should a capture fail (an operator that cannot be captured), a one-line warning says so and
the run goes on eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_dist.models.auxk import AuxCandidates

WARMUP_STEPS = 2
"""Eager steps of a key before its graphs are captured."""


class StepGraphs:
    """The two graphs of one step and the buffers they read; see the module doc. `before_update(x_TD, aux, weights)`
    and `after_update(its result)` are the step's device work before and after the update (`step.TrainStep`)."""

    def __init__(self, before_update: Callable[[Tensor, AuxCandidates | None, dict[str, float]], Any],
                 after_update: Callable[[Any], None]):
        self.before_update_work, self.after_update_work = before_update, after_update
        self.key: tuple | None = None
        """The key of the captured (or about to be captured) graphs."""
        self.warming: tuple[tuple | None, int] = (None, 0)
        """(key, eager steps of it in a row)."""
        self.failed = False
        """A capture failed: every step runs eagerly."""
        self.reset()

    def reset(self) -> None:
        """Forget the graphs (the next steps run eagerly and capture again): parameters or shapes changed."""
        self.key = None
        self.before: torch.cuda.CUDAGraph | None = None
        self.after: torch.cuda.CUDAGraph | None = None
        self.x_TD: Tensor | None = None
        self.aux: AuxCandidates | None = None
        self.result: Any = None

    def ready(self, x_TD: Tensor, aux: AuxCandidates | None, weights: dict[str, float]) -> bool:
        """Whether this step runs from graphs (replayed, or captured now); False: it runs eagerly."""
        key = (tuple(x_TD.shape), x_TD.dtype, None if aux is None else tuple(aux.ids_NC.shape),
               tuple(sorted(weights.items())))
        if key == self.key:
            return True
        self.reset()
        if self.failed:
            return False
        warming_key, count = self.warming
        count = count + 1 if key == warming_key else 1
        self.warming = (key, count)
        if count <= WARMUP_STEPS:
            return False
        self.key = key
        return True

    def before_update(self, x_TD: Tensor, aux: AuxCandidates | None, weights: dict[str, float]) -> Any:
        """Part 1 of the step on `x_TD`: capture it at the first call of a key, then replay; the result's tensors
        are the graph's outputs. None: the capture failed, run the step eagerly."""
        if self.before is None:
            self.x_TD = x_TD.clone()
            self.aux = None if aux is None else AuxCandidates(aux.ids_NC.clone(), aux.dead_NC.clone())
            graph = self._capture(lambda: self.before_update_work(self.x_TD, self.aux, weights))
            if graph is None:
                return None
            self.before = graph  # the parameters' .grad are now the tensors its backward writes
        else:
            self.x_TD.copy_(x_TD)
            if aux is not None:
                self.aux.ids_NC.copy_(aux.ids_NC)
                self.aux.dead_NC.copy_(aux.dead_NC)
        self.before.replay()
        return self.result

    def after_update(self) -> bool:
        """Part 3 of the step: captured at its first call (in the first graph's memory pool), then replayed.
        False: the capture failed, run it eagerly."""
        if self.after is None:
            self.after = self._capture(lambda: self.after_update_work(self.result), self.before.pool())
            if self.after is None:
                return False
        self.after.replay()
        return True

    def _capture(self, device_work, pool=None) -> torch.cuda.CUDAGraph | None:
        """A graph of `device_work()` (whose return value is kept as `self.result` when not None), or None (and
        every later step eager) when it cannot be captured."""
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the data path's prefetch thread keeps allocating and copying while this one captures.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                result = device_work()
        except RuntimeError as exc:
            self.failed = True
            self.key = None
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            tqdm.write(f"warning: the training step cannot be captured as a CUDA graph ({first_line}); it runs "
                       "eagerly (trainer.cuda_graph=false silences this)")
            return None
        if result is not None:
            self.result = result
        return graph
