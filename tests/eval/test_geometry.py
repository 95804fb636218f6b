"""Decoder geometry on constructed decoders with known duplicates, chunking against brute force, and the command."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from sae_dist.config import SAEConfig
from sae_dist.data import build_activation_source
from sae_dist.eval.geometry import expert_rows, geometry, max_cosine_per_expert
from sae_dist.models import build_sae
from sae_dist.run_dir import latest_checkpoint
from sae_dist.train.trainer import Trainer
from tests.conftest import small_run

ROOT = Path(__file__).resolve().parents[2]


def _constructed_decoder() -> torch.Tensor:
    """3 experts of 4 rows in d=12, all rows orthonormal except: expert 1 row 0 = expert 0 row 2 (exact
    duplicate), expert 2 row 3 = a 0.95-cosine copy of expert 0 row 1, expert 2 row 1 a 0.8-cosine copy of
    expert 1 row 2 (not a duplicate)."""
    basis = torch.eye(12)
    rows = basis.view(3, 4, 12).clone()
    rows[1, 0] = basis[2]
    rows[2, 3] = 0.95 * basis[1] + (1 - 0.95**2) ** 0.5 * basis[11]
    rows[2, 1] = 0.8 * basis[6] + 0.6 * basis[9]
    return rows


def test_duplicates_and_nearest_neighbours_on_constructed_decoder():
    geo = geometry(_constructed_decoder())
    dup = geo.duplicate_M.view(3, 4)
    expected = torch.zeros(3, 4, dtype=torch.bool)
    # pairs (0,2)<->(1,0) and (0,1)<->(2,3) are duplicates, seen from both sides
    expected[0, 2] = expected[1, 0] = expected[0, 1] = expected[2, 3] = True
    assert torch.equal(dup, expected)
    summary = geo.summary()
    assert summary["duplicate_fraction"] == pytest.approx(4 / 12)
    assert summary["duplicates_per_expert"] == [2, 1, 1]
    across = geo.across_nn_M.view(3, 4)
    assert across[1, 0] == pytest.approx(1.0)
    assert across[2, 3] == pytest.approx(0.95)
    assert across[2, 1] == pytest.approx(0.8) and across[1, 2] == pytest.approx(0.8)
    # within each expert: expert 2 rows 1 and 3 have cosine 0 with each other; all rows pairwise orthogonal
    assert torch.allclose(geo.within_nn_M, torch.zeros(12), atol=1e-6)
    # similarity [a, b] = mean over a's rows of their best cosine in b
    sim = geo.similarity_NN
    assert sim[0, 1] == pytest.approx(1.0 / 4)  # only expert 0 row 2 has a match (1.0) in expert 1
    assert sim[2, 0] == pytest.approx(0.95 / 4)
    assert sim[1, 2] == pytest.approx(0.8 / 4)


def test_chunked_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    rows = torch.nn.functional.normalize(torch.randn(4, 16, 8, generator=g), dim=-1)
    flat = rows.reshape(64, 8)
    cos = flat @ flat.T
    cos.fill_diagonal_(-float("inf"))
    brute = cos.view(64, 4, 16).amax(-1)
    for chunk in (1, 7, 64, 1000):
        assert torch.allclose(max_cosine_per_expert(rows, chunk), brute)


def test_single_expert_sae_has_no_across_statistics():
    sae = build_sae(SAEConfig(kind="topk", num_latents=32, num_experts=1, k=4), 8, seed=0)
    summary = geometry(expert_rows(sae)).summary()
    assert summary["num_experts"] == 1 and summary["duplicate_fraction"] is None
    switch = build_sae(SAEConfig(kind="switch", num_latents=32, num_experts=4, k=4), 8, seed=0)
    rows = expert_rows(switch, "encoder")
    assert rows.shape == (4, 8, 8) and torch.allclose(rows.norm(dim=-1), torch.ones(4, 8))


def test_geometry_in_chunks_smaller_than_m_equals_one_chunk():
    rows = expert_rows(build_sae(SAEConfig(kind="switch", num_latents=96, num_experts=3, k=4), 16, seed=1))
    whole = geometry(rows, chunk=96)
    for chunk in (5, 32):
        part = geometry(rows, chunk=chunk)
        for name in ("within_nn_M", "across_nn_M", "similarity_NN"):
            torch.testing.assert_close(getattr(part, name), getattr(whole, name))
        assert part.summary()["duplicate_fraction"] == whole.summary()["duplicate_fraction"]


def test_analyze_command_writes_geometry_json(tmp_path, monkeypatch, capsys):
    run = small_run(tmp_path, steps=10, checkpoint_every=10)
    Trainer(run, build_activation_source(run)).train()
    out = tmp_path / "geometry"
    monkeypatch.setattr(sys, "argv", ["analyze.py", run.trainer.out_dir, "--out", str(out), "--tsne",
                                      "--tsne-points", "48"])
    runpy.run_path(str(ROOT / "launch/analyze.py"), run_name="__main__")
    assert "NN cosine across experts" in capsys.readouterr().out
    summary = json.loads((out / "geometry.json").read_text())
    similarity = summary["expert_similarity"]
    assert len(similarity) == 4 and all(len(row) == 4 for row in similarity)
    assert summary["checkpoint"] == str(latest_checkpoint(run.trainer.out_dir))
    assert 0 <= summary["duplicate_fraction"] <= 1 and len(summary["duplicates_per_expert"]) == 4
    assert (out / "similarity.png").exists() and (out / "tsne.png").stat().st_size > 5_000


def test_analyze_command_missing_checkpoint_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["analyze.py", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "launch/analyze.py"), run_name="__main__")
    assert exit_info.value.code == 2 and "no SAE checkpoint" in capsys.readouterr().err
