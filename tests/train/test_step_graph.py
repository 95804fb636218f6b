"""When the step runs from CUDA graphs (`step_graph.py`): the key logic, on any machine (the graphs themselves are
checked on a GPU in test_cuda.py)."""

import torch

from sae_dist.data import build_activation_source
from sae_dist.models.auxk import AuxCandidates
from sae_dist.train.step_graph import WARMUP_STEPS, StepGraphs
from sae_dist.train.trainer import Trainer
from tests.train.test_step import step_run


def _aux(width: int) -> AuxCandidates:
    return AuxCandidates(torch.zeros(4, width, dtype=torch.long), torch.zeros(4, width, dtype=torch.bool))


def test_graphs_are_used_after_warm_up_steps_of_the_same_key():
    """Each key (shapes, AuxK width, loss weights) first runs WARMUP_STEPS eager steps; a change of key drops the
    captured graphs and warms up again."""
    graphs = StepGraphs(before_update=None, after_update=None)
    x_TD = torch.zeros(8, 4)
    steps = [(x_TD, None, {"auxk": 0.5})] * (WARMUP_STEPS + 2)
    steps += [(x_TD, _aux(4), {"auxk": 0.5})] * (WARMUP_STEPS + 1)
    steps += [(x_TD, _aux(4), {"auxk": 0.25})] * (WARMUP_STEPS + 1)
    steps += [(torch.zeros(16, 4), _aux(4), {"auxk": 0.25})] * (WARMUP_STEPS + 1)
    ready = []
    for x, aux, weights in steps:
        ready.append(graphs.ready(x, aux, weights))
        if not ready[-1]:
            assert graphs.key is None and graphs.before is None
    warm = [False] * WARMUP_STEPS
    assert ready == warm + [True, True] + (warm + [True]) * 3


def test_graphs_apply_on_one_gpu_only(tmp_path):
    run = step_run(tmp_path, "switch")
    run.trainer.cuda_graph = True
    trainer = Trainer(run, build_activation_source(run))
    assert trainer.stepper.graphs is None


def test_step_result_holds_no_autograd_graph(tmp_path):
    """A result kept past the step (the loop keeps the last one) must not keep the step's autograd graph, and with
    it the parameters' gradient accumulators, alive: on a GPU the next step's capture would wait on their stream."""
    run = step_run(tmp_path, "switch")
    trainer = Trainer(run, build_activation_source(run))
    result = trainer.train_step(trainer.source.next_batch(run.trainer.batch_size))
    out = result.out
    tensors = [out.x_hat_TD, out.latent_values_RK, *out.routing, *result.terms.values(), result.loss]
    assert all(not t.requires_grad and t.grad_fn is None for t in tensors)
