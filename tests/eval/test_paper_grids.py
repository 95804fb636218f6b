"""The paper's experiment grids (conf/experiment/paper): each composes and validates, and its multirun sweep expands
into valid jobs that train into distinct folders."""

from functools import cache
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from sae_dist.config import RunConfig, register_configs
from sae_dist.validation import to_run_config

register_configs()

CONF = Path(__file__).resolve().parents[2] / "conf"
GRIDS = sorted(p.stem for p in (CONF / "experiment" / "paper").glob("*.yaml"))


def sweep_jobs(cfg) -> list[list[str]]:
    """The override lists of the jobs `launch/train.py -m` would launch (Hydra's basic sweeper expansion)."""
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    overrides = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    return [job for batch in BasicSweeper.split_arguments(overrides, max_batch_size=None) for job in batch]


@cache
def compose_grid(grid: str) -> tuple[RunConfig, list[RunConfig]]:
    """(the base run, the run of every sweep job) of a grid, each validated."""
    experiment = f"+experiment=paper/{grid}"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        base = compose(config_name="config", overrides=[experiment], return_hydra_config=True)
        jobs = [to_run_config(compose(config_name="config", overrides=[experiment, *job])) for job in sweep_jobs(base)]
    return to_run_config(base), jobs


@pytest.mark.parametrize("grid", GRIDS)
def test_grid_composes_and_its_sweep_expands_into_valid_distinct_jobs(grid):
    run, jobs = compose_grid(grid)
    assert (run.model.name, run.model.layer) == ("openai-community/gpt2", 8)
    assert run.data.dataset == "Skylion007/openwebtext" and run.trainer.batch_size == 8192
    assert len(jobs) > 1 and len({job.trainer.out_dir for job in jobs}) == len(jobs)
    assert all(job.trainer.out_dir.startswith(f"runs/paper/{grid}/") for job in jobs)


def test_grids_hold_the_papers_settings():
    def jobs(grid):
        return [job.sae for job in compose_grid(grid)[1]]

    width = jobs("width_matched")
    assert {s.num_latents for s in width} == {24576} and {s.num_experts for s in width} == {16, 32, 64, 128}
    for n in (2, 4, 8):
        assert {(s.num_latents // s.num_experts, s.num_experts) for s in jobs(f"flop_matched_n{n}")} == {(24576, n)}
    scaling = jobs("scaling_switch")
    assert {s.num_latents for s in scaling} == {2**p for p in range(11, 18)} and {s.k for s in scaling} == {32}
    assert {s.num_experts for s in scaling} == {8, 64}
    assert {(s.kind, s.num_latents) for s in jobs("topk_24k")} == {("topk", 24576)}
