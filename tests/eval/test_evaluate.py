"""The splice measures on a tiny random GPT-2 (cross-entropy) and the bundled MiniLM (embedding), and a whole
evaluation of a checkpoint on each path. No downloads."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import GPT2Config, GPT2LMHeadModel

from sae_dist.config import DataConfig, ModelConfig, RunConfig, SAEConfig, validate
from sae_dist.data import find_blocks, load_lm
from sae_dist.eval.evaluate import EvalConfig, WindowStats, evaluate_checkpoint, mean_se
from sae_dist.eval.splice import MEASURE_CE, MEASURE_EMBEDDING, clean_pass, splice_measure, spliced_measures
from sae_dist.models import build_sae
from sae_dist.train.checkpoint import write_model_files


@pytest.fixture(scope="module")
def minilm():
    return load_lm(ModelConfig(name="minilm-bundled"))


@pytest.fixture(scope="module")
def gpt2_dir(minilm, tmp_path_factory):
    """A randomly initialised 2-block GPT-2 with an LM head (d=64) and the MiniLM tokenizer, on disk."""
    _, tokenizer = minilm
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=tokenizer.vocab_size)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _ragged_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three right-padded contexts of lengths 12, 7 and 12."""
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(5, vocab, (n,), generator=g) for n in (12, 7, 12)]
    ids_BT = pad_sequence(ids, batch_first=True, padding_value=0)
    mask_BT = pad_sequence([torch.ones_like(i) for i in ids], batch_first=True)
    return ids_BT, mask_BT


def test_cross_entropy_path_exact_splice_is_clean_and_zero_splice_is_ablation(gpt2_dir):
    model, _ = load_lm(ModelConfig(name="unused", path=str(gpt2_dir)), auto_class=GPT2LMHeadModel)
    assert splice_measure(model) == MEASURE_CE
    block = find_blocks(model)[0]
    ids_BT, mask_BT = _ragged_batch(model.config.vocab_size)
    clean_out, h_BTD = clean_pass(model, block, ids_BT, mask_BT)
    x_TD = h_BTD[mask_BT.bool()]
    exact = spliced_measures(model, block, ids_BT, mask_BT, clean_out, x_TD)
    assert exact["ce_reconstructed"] == pytest.approx(exact["ce_clean"], abs=1e-5)
    assert exact["delta_ce"] == pytest.approx(0, abs=1e-5)
    assert exact["kl_reconstructed"] == pytest.approx(0, abs=1e-6)
    assert exact["fraction_recovered"] == pytest.approx(1, abs=1e-4)
    # the clean loss is the model's own next-token loss, here on the two unpadded contexts alone
    full = mask_BT.all(1)
    with torch.no_grad():
        own = model(input_ids=ids_BT[full], labels=ids_BT[full]).loss
    only_full = spliced_measures(model, block, ids_BT[full], mask_BT[full], clean_out[full], h_BTD[full].flatten(0, 1))
    assert only_full["ce_clean"] == pytest.approx(float(own), rel=1e-5)

    zeros = spliced_measures(model, block, ids_BT, mask_BT, clean_out, torch.zeros_like(x_TD))
    assert zeros["ce_reconstructed"] == pytest.approx(zeros["ce_zero_ablated"], abs=1e-5)
    assert zeros["kl_reconstructed"] == pytest.approx(zeros["kl_zero_ablated"], abs=1e-5)
    assert zeros["fraction_recovered"] == pytest.approx(0, abs=1e-4)
    assert zeros["ce_zero_ablated"] != pytest.approx(zeros["ce_clean"], abs=1e-3)


def test_embedding_path_on_minilm(minilm):
    model, tokenizer = minilm
    assert splice_measure(model) == MEASURE_EMBEDDING
    block = find_blocks(model)[3]
    encoded = tokenizer(["Lists are mutable sequences.", "The with statement wraps a block."], padding=True,
                        return_tensors="pt")
    ids_BT, mask_BT = encoded["input_ids"], encoded["attention_mask"]
    assert not mask_BT.all()  # the shorter sentence is padded
    clean_out, h_BTD = clean_pass(model, block, ids_BT, mask_BT)
    exact = spliced_measures(model, block, ids_BT, mask_BT, clean_out, h_BTD[mask_BT.bool()])
    assert exact["cosine_reconstructed"] == pytest.approx(1, abs=1e-5)
    assert exact["fraction_recovered"] == pytest.approx(1, abs=1e-4)
    assert exact["cosine_zero_ablated"] < 0.9
    noisy = h_BTD[mask_BT.bool()] + 0.5 * torch.randn_like(h_BTD[mask_BT.bool()])
    partial = spliced_measures(model, block, ids_BT, mask_BT, clean_out, noisy)
    assert exact["cosine_zero_ablated"] < partial["cosine_reconstructed"] < 1


def test_window_stats_by_hand():
    stats = WindowStats(num_latents=6, num_experts=2)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]])
    values = torch.tensor([[0.5, 0.0], [1.0, 2.0], [3.0, 0.0]])
    indices = torch.tensor([[1, 0], [4, 5], [3, 4]])  # tokens 0 -> expert 0; 1, 2 -> expert 1
    stats.add(x, x_hat, values, indices)
    rec, experts = stats.report()
    assert rec["mse"] == pytest.approx((1 + 4 + 0) / 3)
    assert rec["l0"] == pytest.approx(4 / 3)
    assert rec["dead_latents"] == 2  # latent 0 was chosen with value 0, latent 2 never chosen
    assert [e["load"] for e in experts] == pytest.approx([1 / 3, 2 / 3])
    assert [e["mse"] for e in experts] == pytest.approx([1.0, 2.0])
    assert [e["dead_latents"] for e in experts] == [2, 0]


def test_mean_se_by_hand():
    mean, se = mean_se([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0
    assert se == pytest.approx(math.sqrt(((4 + 1 + 0 + 9) / 3) / 4))
    assert math.isnan(mean_se([2.0])[1])


def _write_checkpoint(folder, run: RunConfig, d_model: int):
    validate(run)
    folder.mkdir(parents=True)
    write_model_files(folder, build_sae(run.sae, d_model, seed=0), run, d_model, step=7)
    return folder


def test_evaluate_checkpoint_cross_entropy_path(gpt2_dir, tmp_path):
    run = RunConfig(sae=SAEConfig(kind="switch", num_latents=128, num_experts=4, k=8),
                    model=ModelConfig(name="tiny", path=str(gpt2_dir), layer=1),
                    data=DataConfig(source="lm", dataset="pydoc-topics", streaming=False, ctx_len=32))
    folder = _write_checkpoint(tmp_path / "ckpt", run, 64)
    cfg = EvalConfig(window_tokens=600, splice_batches=3, batch_contexts=4)
    report = evaluate_checkpoint(folder, cfg)
    assert report["step"] == 7 and report["data"]["dataset"] == "pydoc-topics"
    assert report["data"]["doc_offset"] == int(report["data"]["documents"] * 0.9)
    splice, rec = report["splice"], report["reconstruction"]
    assert splice["measure"] == MEASURE_CE and splice["batches"] == 3
    for key in ("ce_clean", "ce_reconstructed", "ce_zero_ablated", "kl_reconstructed", "fraction_recovered"):
        assert math.isfinite(splice[key]) and math.isfinite(splice[f"{key}_se"])
    assert splice["delta_ce"] == pytest.approx(splice["ce_reconstructed"] - splice["ce_clean"])
    assert rec["tokens"] >= 600 and rec["l0"] <= 8
    assert sum(e["load"] for e in report["experts"]) == pytest.approx(1)
    assert sum(e["dead_latents"] for e in report["experts"]) == rec["dead_latents"]


def test_evaluate_checkpoint_on_synthetic_source(tmp_path):
    run = RunConfig(sae=SAEConfig(kind="topk", num_latents=64, num_experts=1, k=4),
                    data=DataConfig(source="synthetic", d_model=16, synthetic_features=32, synthetic_active=3))
    folder = _write_checkpoint(tmp_path / "ckpt", run, 16)
    report = evaluate_checkpoint(folder, EvalConfig(window_tokens=3000, batch_tokens=1000))
    assert "splice" not in report and report["data"]["held_out"]
    assert report["reconstruction"]["tokens"] == 3000 and report["reconstruction"]["batches"] == 3
    assert report["experts"][0]["load"] == 1.0
