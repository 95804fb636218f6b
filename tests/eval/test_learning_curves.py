"""Learning curves: a point per checkpoint scored on a held-out cache (stored and reused), and the crossing point."""

from __future__ import annotations

import pytest
import torch

from sae_dist import load_sae
from sae_dist.data import build_activation_source, write_cache
from sae_dist.data.cache import CacheUnitReader
from sae_dist.data.synthetic import SyntheticSource
from sae_dist.eval import learning_curves
from sae_dist.eval.learning_curves import checkpoint_curve, crossing, interpolate
from sae_dist.train.run import train_from_config
from tests.conftest import small_run


def test_crossing_interpolates_the_reference_in_log_x():
    reference_x, reference_y = [1, 100], [10.0, 8.0]  # at x = 10 the reference is 9
    assert crossing([1, 10, 100], [12.0, 9.0, 7.0], reference_x, reference_y) == 10
    assert crossing([1, 10, 100], [12.0, 9.5, 8.5], reference_x, reference_y) is None
    assert crossing([1000], [1.0], reference_x, reference_y) is None, "outside the reference's range"


def test_interpolate_is_linear_in_log_x_and_none_outside():
    x_ref, y_ref = [1, 100, 1000], [10.0, 8.0, 2.0]
    assert interpolate(10, x_ref, y_ref) == pytest.approx(9.0)
    assert interpolate(1000, x_ref, y_ref) == 2.0
    assert interpolate(10 ** 2.5, x_ref, y_ref) == pytest.approx(5.0)
    assert interpolate(0.5, x_ref, y_ref) is None and interpolate(2000, x_ref, y_ref) is None


def test_checkpoint_curve_scores_every_checkpoint_once(tmp_path, monkeypatch):
    run = small_run(tmp_path, steps=6, log_every=2, checkpoint_every=2, keep_checkpoints=5)
    train_from_config(run, eval_batches=1)
    heldout = tmp_path / "heldout"
    write_cache(SyntheticSource(64, 128, 4, 0.01, seed=9), heldout, 600, 256, config={"who": "test"})
    points = checkpoint_curve(tmp_path / "run", heldout)
    assert [(p.step, p.tokens) for p in points] == [(2, 512), (4, 1024), (6, 1536)]
    assert all(p.dead is not None for p in points), "dead latents of the logged steps"
    # The last point's MSE straight from the model's forward over every held-out row.
    x_TD = CacheUnitReader(heldout).read_rows(0, 600)
    with torch.no_grad():
        x_hat_TD = load_sae(tmp_path / "run").forward(x_TD).x_hat_TD
    assert points[-1].mse == pytest.approx(float((x_TD - x_hat_TD).pow(2).sum(1).mean()), rel=1e-5)
    assert points[0].mse > points[-1].mse

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a stored point was evaluated again")

    monkeypatch.setattr(learning_curves, "heldout_metrics", no_evaluation)
    assert checkpoint_curve(tmp_path / "run", heldout) == points


def test_a_transcoder_curve_scores_the_target(tmp_path):
    """A skip transcoder's held-out cache holds rows [x | y]: the point's MSE is y's, from the model's forward."""
    run = small_run(tmp_path, kind="topk", steps=4, log_every=2, checkpoint_every=2, keep_checkpoints=5)
    run.sae.d_out, run.sae.skip = 24, True
    train_from_config(run, eval_batches=1)
    heldout = tmp_path / "heldout"
    source = build_activation_source(run)
    write_cache(source, heldout, 600, 256, config={"who": "test"})
    rows = CacheUnitReader(heldout).read_rows(0, 600)
    assert rows.shape == (600, 64 + 24)
    points = checkpoint_curve(tmp_path / "run", heldout)
    with torch.no_grad():
        y_hat_TO = load_sae(tmp_path / "run").forward(rows[:, :64]).x_hat_TD
    assert y_hat_TO.shape == (600, 24)
    assert points[-1].mse == pytest.approx(float((rows[:, 64:] - y_hat_TO).pow(2).sum(1).mean()), rel=1e-5)


def test_a_curve_has_one_colour_in_every_panel(tmp_path, monkeypatch):
    """k = 16 lacks a run that k = 32 has: each label keeps its colour across the panels, dense is black."""
    figures = []
    monkeypatch.setattr(learning_curves, "save_figure", lambda fig, out: figures.append(fig) or out)
    curve = ([1e6, 2e6], [1e12, 2e12], [3.0, 2.0])
    curves = {16: {"dense": curve, "paper": curve, "recommended": curve},
              32: {"dense": curve, "expert_lr": curve, "paper": curve, "recommended": curve}}
    learning_curves.plot_curves(curves, tmp_path / "curves.png", "title")
    colour_of: dict[str, set] = {}
    for ax in figures[0].axes:
        for line in ax.get_lines():
            colour_of.setdefault(line.get_label(), set()).add(line.get_color())
    assert colour_of["dense"] == {"black"}
    assert all(len(colours) == 1 for colours in colour_of.values()), colour_of
    assert len({next(iter(c)) for c in colour_of.values()}) == 4


def test_a_label_order_gives_a_label_one_colour_in_every_figure(tmp_path, monkeypatch):
    """Two figures of different runs agree on each label's colour when given one order of every label."""
    figures = []
    monkeypatch.setattr(learning_curves, "save_figure", lambda fig, out: figures.append(fig) or out)
    curve = ([1e6, 2e6], [1e12, 2e12], [3.0, 2.0])
    order = ["paper", "expert_lr", "recommended"]
    learning_curves.plot_curves({32: {"dense": curve, "expert_lr": curve, "paper": curve, "recommended": curve}},
                                tmp_path / "a.png", "title", order)
    learning_curves.plot_curves({32: {"dense": curve, "dense_auxk_gao": curve, "recommended": curve, "other": curve}},
                                tmp_path / "b.png", "title", order)
    colours = [{line.get_label(): (line.get_color(), line.get_linestyle()) for line in fig.axes[0].get_lines()}
               for fig in figures]
    assert colours[0]["recommended"] == colours[1]["recommended"] == ("C2", "-")
    assert colours[0]["paper"] == ("C0", "-") and colours[1]["other"] == ("C3", "-")
    assert colours[1]["dense"] == ("black", "-") and colours[1]["dense_auxk_gao"] == ("black", "--")
