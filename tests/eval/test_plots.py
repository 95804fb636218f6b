"""Plots from small synthetic runs: every PNG is written, non-blank, and the runs are grouped as the paper does."""

import json
import runpy
import sys
from pathlib import Path

import matplotlib.image
import pytest

from sae_dist.config import SAEConfig
from sae_dist.eval.plots import plot_runs
from sae_dist.eval.runs import load_run_point, run_family
from sae_dist.run_dir import latest_checkpoint
from sae_dist.train.run import train_from_config
from tests.conftest import small_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """A dense TopK run (M = 256), a FLOP-matched Switch (4 x 256) and a width-matched one (256 / 4)."""
    root = tmp_path_factory.mktemp("runs")
    saes = {
        "topk": SAEConfig(kind="topk", num_latents=256, num_experts=1, k=8),
        "switch_flop": SAEConfig(kind="switch", num_latents=1024, num_experts=4, k=8, lb_alpha=0.1),
        "switch_width": SAEConfig(kind="switch", num_latents=256, num_experts=4, k=8, lb_alpha=0.1),
    }
    dirs = []
    for name, sae in saes.items():
        run = small_run(root, steps=10, checkpoint_every=10, out_dir=str(root / name))
        run.sae = sae
        train_from_config(run, eval_batches=1)
        dirs.append(Path(run.trainer.out_dir))
    similarity = [[1.0, 0.2, 0.1, 0.0], [0.2, 1.0, 0.3, 0.1], [0.1, 0.3, 1.0, 0.2], [0.0, 0.1, 0.2, 1.0]]
    (dirs[1] / "geometry.json").write_text(json.dumps({"expert_similarity": similarity}))
    return dirs


def assert_nonblank_png(path: Path):
    assert path.is_file() and path.stat().st_size > 5_000
    pixels = matplotlib.image.imread(path)[..., :3]
    assert (pixels < 0.9).any(axis=-1).mean() > 0.01  # more than 1% of pixels drawn in a non-white colour


def test_points_come_from_the_final_row_or_eval_json(run_dirs):
    points = [load_run_point(d) for d in run_dirs]
    assert [run_family(points, p) for p in points] == ["TopK", "Switch FLOP-matched", "Switch width-matched"]
    assert all(p.tokens == 10 * 256 and p.d_model == 64 and p.l0 > 0 for p in points)
    checkpoint = latest_checkpoint(run_dirs[0])
    (checkpoint / "eval.json").write_text(json.dumps({"reconstruction": {"mse": 1.5, "fvu": 0.25, "l0": 7.5}}))
    try:
        point = load_run_point(run_dirs[0])
        assert (point.mse, point.fvu, point.l0) == (1.5, 0.25, 7.5)
    finally:
        (checkpoint / "eval.json").unlink()


def test_plot_command_writes_every_figure(run_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["plot.py", *map(str, run_dirs), "--out", str(tmp_path)])
    runpy.run_path(str(ROOT / "launch/plot.py"), run_name="__main__")
    stdout = capsys.readouterr().out
    names = {"pareto.png", "scaling.png", "expert_load.png", "similarity_switch_flop.png"}
    assert {p.name for p in tmp_path.iterdir()} == names
    for name in names:
        assert_nonblank_png(tmp_path / name)
        assert str(tmp_path / name) in stdout


def test_plot_runs_in_process(run_dirs, tmp_path):
    written = plot_runs(run_dirs[:1], tmp_path)  # a dense run alone: no expert load, no similarity
    assert [p.name for p in written] == ["pareto.png", "scaling.png"]
