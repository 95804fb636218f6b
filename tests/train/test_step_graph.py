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
    graphs = StepGraphs(trainer=None)
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
    assert run.trainer.cuda_graph
    trainer = Trainer(run, build_activation_source(run))
    assert not trainer.graphs_apply() and trainer._graphs is None
