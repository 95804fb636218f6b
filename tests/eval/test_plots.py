"""Plots from small synthetic runs: every PNG is written, non-blank, and the runs are grouped as the paper does."""

import json
import runpy
import shutil
import sys
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest

from sae_dist.config import RunConfig, SAEConfig, TrainerConfig
from sae_dist.eval.plots import PARETO_SWEEPS, SCALING_SWEEPS, plot_expert_load, plot_runs
from sae_dist.eval.runs import RunPoint, load_run_point, run_family, series, shared_title
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


def point(name, kind="switch", m=1024, n=4, k=8, steps=20, mse=1.0, l0=8.0) -> RunPoint:
    run = RunConfig(name=name, sae=SAEConfig(kind=kind, num_latents=m, num_experts=n if kind == "switch" else 1, k=k),
                    trainer=TrainerConfig(steps=steps, out_dir=f"runs/{name}", log_every=7))
    return RunPoint(name, run, d_model=64, tokens=steps * 256, mse=mse, fvu=0.5, l0=l0)


def test_a_line_joins_only_runs_that_differ_in_the_swept_settings():
    """Formerly every Switch run with the same N was one line, whatever its width or length."""
    points = [point("topk_k8", "topk", m=256), point("topk_k16", "topk", m=256, k=16, l0=16),
              point("flop_k8"), point("flop_k16", k=16, l0=16), point("flop_k8_long", steps=40),
              point("width_k8", m=256)]
    lines = {line.label: [p.name for p in line.points] for line in series(points, PARETO_SWEEPS, lambda p: p.l0)}
    assert lines == {"TopK M=256 steps=20": ["topk_k8", "topk_k16"],
                     "Switch FLOP-matched M=1024 steps=20": ["flop_k8", "flop_k16"],
                     "Switch FLOP-matched M=1024 steps=40": ["flop_k8_long"],
                     "Switch width-matched M=256 steps=20": ["width_k8"]}
    # MSE vs compute sweeps width and length: one line per architecture and k; where and how often a run
    # logged (log_every, out_dir, name) never splits a line.
    def compute(p: RunPoint) -> float:
        return p.run.sae.num_latents * p.tokens

    scaling = {line.label: [p.name for p in line.points] for line in series(points, SCALING_SWEEPS, compute, False)}
    assert scaling == {"Switch k=8": ["width_k8", "flop_k8", "flop_k8_long"], "Switch k=16": ["flop_k16"],
                       "TopK k=8": ["topk_k8"], "TopK k=16": ["topk_k16"]}


def test_titles_name_the_settings_all_runs_share():
    title = shared_title([point("a"), point("b", k=16)], "MSE vs L0")
    assert title == "MSE vs L0\ndata=lm, model=gpt2, layer=8, dataset=openwebtext, steps=20, batch=8192, d=64"


def test_a_folder_that_is_not_a_run_is_refused_before_the_output_folder(run_dirs, tmp_path, monkeypatch, capsys):
    """One line on stderr and nothing on stdout (the output folder's line came first), no folder created."""
    monkeypatch.setattr(sys, "argv", ["plot.py", str(run_dirs[0]), str(tmp_path), "--out", str(tmp_path / "plots")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "launch/plot.py"), run_name="__main__")
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert (captured.out, captured.err) == ("", f"error: {tmp_path} is not a run folder: it has no config.yaml\n")
    assert not (tmp_path / "plots").exists()


def test_the_expert_load_of_a_run_logged_once_is_drawn(run_dirs, tmp_path):
    """A run with one logged row (a short run) gets its shares as one stacked bar; a stack plot of one step drew
    an empty panel."""
    run = tmp_path / "short_run"
    run.mkdir()
    shutil.copy(run_dirs[1] / "config.yaml", run / "config.yaml")
    first = next(line for line in (run_dirs[1] / "metrics.jsonl").read_text().splitlines() if "expert_load" in line)
    (run / "metrics.jsonl").write_text(first + "\n")
    path = plot_expert_load([run], tmp_path / "expert_load.png")
    pixels = matplotlib.image.imread(path)[..., :3]
    expert_0 = np.array(plt.get_cmap("tab20", 4)(0)[:3])
    assert (np.abs(pixels - expert_0).max(axis=-1) < 0.02).mean() > 0.02  # its band, not only its legend entry
