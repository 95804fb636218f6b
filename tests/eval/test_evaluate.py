"""The splice measures on a tiny random GPT-2 (cross-entropy) and the bundled MiniLM (embedding), the metric
definitions on hand-computed values, and whole evaluations: of a checkpoint on each splice path, and of a briefly
trained synthetic run through the command line. No downloads."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import GPT2Config, GPT2LMHeadModel

from sae_dist import load_sae
from sae_dist.config import ConfigError, DataConfig, ModelConfig, RunConfig, SAEConfig
from sae_dist.data import HookedLM, SyntheticSource, build_activation_source, find_blocks, load_lm, resolve_site
from sae_dist.data.sites import site_module
from sae_dist.eval.evaluate import (
    HELDOUT_RANK,
    EvalConfig,
    WindowStats,
    evaluate,
    heldout_contexts,
    mean_se,
    summarise_splice,
)
from sae_dist.eval.splice import (
    MEASURE_CE,
    MEASURE_EMBEDDING,
    clean_pass,
    splice_measure,
    spliced_measures,
    transcoded_measures,
)
from sae_dist.models import build_sae
from sae_dist.run_dir import latest_checkpoint
from sae_dist.train.trainer import Trainer
from sae_dist.validation import validate
from tests.conftest import small_run
from tests.model_files import write_model_files

ROOT = Path(__file__).resolve().parents[2]


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


@pytest.mark.parametrize("hookpoint", ["h.1.mlp:input", "h.1.mlp", "transformer.h.0.attn"])
def test_splice_at_a_site_replaces_that_site(gpt2_dir, hookpoint):
    """At a module's input (pre-hook) or output: the exact activation changes nothing, zeros change the loss, and
    shifting the module's input differs from shifting its output (so the splice acts where the site says)."""
    model, _ = load_lm(ModelConfig(name="unused", path=str(gpt2_dir)), auto_class=GPT2LMHeadModel)
    site = resolve_site(model, hookpoint)
    module = site_module(model, site)
    ids_BT, mask_BT = _ragged_batch(model.config.vocab_size)
    clean_out, h_BTD = clean_pass(model, module, ids_BT, mask_BT, site.side)
    torch.testing.assert_close(h_BTD, HookedLM(model, site)._hidden_states(ids_BT, mask_BT)[0], rtol=0, atol=0)
    x_TD = h_BTD[mask_BT.bool()]
    exact = spliced_measures(model, module, ids_BT, mask_BT, clean_out, x_TD, site.side)
    assert exact["delta_ce"] == pytest.approx(0, abs=1e-5) and exact["kl_reconstructed"] == pytest.approx(0, abs=1e-6)
    zeros = spliced_measures(model, module, ids_BT, mask_BT, clean_out, torch.zeros_like(x_TD), site.side)
    assert zeros["ce_zero_ablated"] != pytest.approx(zeros["ce_clean"], abs=1e-4)
    shifted = spliced_measures(model, module, ids_BT, mask_BT, clean_out, x_TD + 1, site.side)
    other = "output" if site.side == "input" else "input"
    _, h_other = clean_pass(model, module, ids_BT, mask_BT, other)
    flipped = spliced_measures(model, module, ids_BT, mask_BT, clean_out, h_other[mask_BT.bool()] + 1, other)
    assert flipped["ce_reconstructed"] != pytest.approx(shifted["ce_reconstructed"], abs=1e-4)


def test_window_stats_by_hand():
    stats = WindowStats(num_latents=6, num_experts=2)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]])
    expert_TE = torch.tensor([[0], [1], [1]])
    active_ids = torch.tensor([1, 4, 5, 3])  # token 0: latent 1; token 1: 4, 5; token 2: 3 (latents 0 and 2 never)
    stats.add(x, x_hat, expert_TE, active_ids)
    rec, experts = stats.report()
    assert rec["mse"] == pytest.approx((1 + 4 + 0) / 3)
    assert rec["l0"] == pytest.approx(4 / 3)
    assert rec["dead_latents"] == 2
    assert [e["load"] for e in experts] == pytest.approx([1 / 3, 2 / 3])
    assert [e["mse"] for e in experts] == pytest.approx([1.0, 2.0])
    assert [e["l0"] for e in experts] == pytest.approx([1.0, 1.5])
    assert [e["dead_latents"] for e in experts] == [2, 0]


def test_window_stats_count_every_expert_of_top2_routing():
    """e = 2: each token counts in both its experts; per-expert load, tokens, MSE, L0 and dead latents equal a
    direct computation from the routing and the token-order latents of `encode`."""
    cfg = SAEConfig(kind="switch", num_latents=128, num_experts=4, k=4, experts_per_token=2)
    sae = build_sae(cfg, 16, seed=3).eval()
    x_TD = torch.randn(300, 16)
    stats = WindowStats(cfg.num_latents, cfg.num_experts)
    stats.add_batch(sae, x_TD)
    rec, experts = stats.report()
    with torch.no_grad():
        expert_TE = sae.router(x_TD).expert_TE
        latents = sae.encode(x_TD)
        x_hat_TD = sae.decode(latents)
    active_TK = latents.values_TK > 0
    expert_TK = latents.indices_TK // 32
    fired = torch.zeros(128, dtype=torch.bool)
    fired[latents.indices_TK[active_TK]] = True
    assert rec["l0"] == pytest.approx(float(active_TK.sum(1).double().mean()))
    assert rec["dead_latents"] == int((~fired).sum())
    assert sum(row["tokens"] for row in experts) == 2 * 300
    for row in experts:
        e = row["expert"]
        rows = (expert_TE == e).any(1)
        assert 0 < rows.sum() < 300
        assert row["tokens"] == int(rows.sum()) and row["load"] == pytest.approx(float(rows.sum()) / 600)
        error_T = (x_TD - x_hat_TD)[rows].double().pow(2).sum(1)
        assert row["mse"] == pytest.approx(float(error_T.mean()), rel=1e-5)
        assert row["l0"] == pytest.approx(float((active_TK & (expert_TK == e))[rows].sum(1).double().mean()))
        assert row["dead_latents"] == int((~fired[e * 32:(e + 1) * 32]).sum())


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


def test_summarise_splice_by_hand():
    rows = [{"ce_clean": 2.0, "ce_reconstructed": 3.0, "ce_zero_ablated": 6.0, "fraction_recovered": 0.75},
            {"ce_clean": 4.0, "ce_reconstructed": 4.0, "ce_zero_ablated": 8.0, "fraction_recovered": 1.0}]
    section = summarise_splice(rows, MEASURE_CE)
    assert section["batches"] == 2 and section["ce_clean"] == 3.0
    assert section["ce_clean_se"] == pytest.approx(1.0)  # std of (2, 4) = sqrt(2), over sqrt(2)
    # FR from the pooled means (3.5 - 7) / (3 - 7), not the mean of the batch ratios; its error from the ratios
    assert section["fraction_recovered"] == pytest.approx(3.5 / 4)
    assert section["fraction_recovered_se"] == pytest.approx(0.125)


def test_evaluate_checkpoint_cross_entropy_path(gpt2_dir, tmp_path):
    run = RunConfig(sae=SAEConfig(kind="switch", num_latents=128, num_experts=4, k=8),
                    model=ModelConfig(name="tiny", path=str(gpt2_dir), layer=1),
                    data=DataConfig(source="lm", dataset="pydoc-topics", streaming=False, ctx_len=32))
    folder = _write_checkpoint(tmp_path / "ckpt", run, 64)
    report = evaluate(folder, batches=3, batch_tokens=200, splice_contexts=10, splice_batch_contexts=4)
    assert report["step"] == 7 and report["data"]["dataset"] == "pydoc-topics"
    assert report["data"]["doc_offset"] == int(report["data"]["documents"] * 0.9)
    splice, rec = report["splice"], report["reconstruction"]
    assert splice["measure"] == "next_token_ce" and splice["batches"] == 3  # 10 contexts as 4 + 4 + 2
    for key in ("ce_clean", "ce_reconstructed", "ce_zero_ablated", "kl_reconstructed", "fraction_recovered"):
        assert math.isfinite(splice[key]) and math.isfinite(splice[f"{key}_se"])
    assert splice["delta_ce"] == pytest.approx(splice["ce_reconstructed"] - splice["ce_clean"])
    assert rec["batches"] == 3 and 600 <= rec["tokens"] < 600 + 3 * 32 and rec["l0"] <= 8
    assert sum(e["load"] for e in report["experts"]) == pytest.approx(1)
    assert sum(e["dead_latents"] for e in report["experts"]) == rec["dead_latents"]


def test_evaluate_checkpoint_at_a_hookpoint(gpt2_dir, tmp_path):
    """A checkpoint trained at the MLP's output (d = 64) is read and spliced there; the report names the site."""
    run = RunConfig(sae=SAEConfig(kind="switch", num_latents=128, num_experts=4, k=8),
                    model=ModelConfig(name="tiny", path=str(gpt2_dir), hookpoint="mlp_out.0"),
                    data=DataConfig(source="lm", dataset="pydoc-topics", streaming=False, ctx_len=32))
    folder = _write_checkpoint(tmp_path / "ckpt", run, 64)
    report = evaluate(folder, batches=2, batch_tokens=100, splice_contexts=4, splice_batch_contexts=4)
    assert report["model"]["hookpoint"] == "mlp_out.0" and report["splice"]["batches"] == 1
    assert math.isfinite(report["splice"]["fraction_recovered"]) and report["reconstruction"]["batches"] == 2


def test_a_transcoders_output_replaces_its_target_computed_from_the_same_passs_input(gpt2_dir):
    """At block 1's MLP: the MLP itself as the transcoder changes nothing; the MLP plus 1 changes the loss as
    adding 1 to the MLP's output does; a target that runs before the input site is one line."""
    model, _ = load_lm(ModelConfig(name="unused", path=str(gpt2_dir)), auto_class=GPT2LMHeadModel)
    mlp = model.transformer.h[1].mlp
    ids_BT, mask_BT = _ragged_batch(model.config.vocab_size)
    clean_out, y_BTD = clean_pass(model, mlp, ids_BT, mask_BT, "output")

    def measures(transcode, source=mlp, target=mlp):
        return transcoded_measures(model, source, "input", target, "output", ids_BT, mask_BT, clean_out, transcode)

    def by_its_weights(x_ND):  # the MLP (dropout is off) without calling the hooked module
        return mlp.c_proj(mlp.act(mlp.c_fc(x_ND)))

    exact = measures(by_its_weights)
    assert exact["delta_ce"] == pytest.approx(0, abs=1e-5) and exact["kl_reconstructed"] == pytest.approx(0, abs=1e-6)
    shifted = measures(lambda x_ND: by_its_weights(x_ND) + 1)
    by_hand = spliced_measures(model, mlp, ids_BT, mask_BT, clean_out, y_BTD[mask_BT.bool()] + 1, "output")
    assert shifted["ce_reconstructed"] == pytest.approx(by_hand["ce_reconstructed"], abs=1e-5)
    assert shifted["ce_zero_ablated"] == by_hand["ce_zero_ablated"] != pytest.approx(shifted["ce_clean"], abs=1e-4)
    with pytest.raises(ConfigError, match="model.target_hookpoint runs before model.hookpoint"):
        measures(lambda x_ND: x_ND, source=model.transformer.h[1], target=model.transformer.h[0].mlp)


def test_evaluate_a_transcoder_of_an_mlp(gpt2_dir, tmp_path):
    """A transcoder from block 0's MLP input to its output whose every output is zero: its splice is the zero
    ablation of the MLP's output (FR 0), and its FVU on the target y is 1 (its residual is y)."""
    run = RunConfig(sae=SAEConfig(kind="switch", num_latents=128, num_experts=4, k=8, d_out=64),
                    model=ModelConfig(name="tiny", path=str(gpt2_dir), hookpoint="mlp_in.0",
                                      target_hookpoint="mlp_out.0"),
                    data=DataConfig(source="lm", dataset="pydoc-topics", streaming=False, ctx_len=32))
    validate(run)
    (tmp_path / "ckpt").mkdir()
    sae = build_sae(run.sae, 64, seed=0)
    with torch.no_grad():
        for weight in (*sae.decoder_weights(), sae.output_bias):
            weight.zero_()
    write_model_files(tmp_path / "ckpt", sae, run, 64, step=7)
    report = evaluate(tmp_path / "ckpt", batches=2, batch_tokens=100, splice_contexts=4, splice_batch_contexts=4)
    assert report["model"]["target_hookpoint"] == "mlp_out.0" and report["d_out"] == 64
    splice = report["splice"]
    assert splice["ce_reconstructed"] == pytest.approx(splice["ce_zero_ablated"], abs=1e-6)
    assert splice["fraction_recovered"] == pytest.approx(0, abs=1e-5)
    assert report["reconstruction"]["fvu"] == pytest.approx(1, abs=1e-9)  # residual y: the variance of y, not of x


def test_heldout_region_is_read_once_without_wrapping(minilm, tmp_path):
    """20 one-line documents, the last 10% held out: 2 contexts, then the region ends (no wrap to document 0)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Document {i} says something about lists." for i in range(20)))
    run = RunConfig(sae=SAEConfig(kind="switch", num_latents=64, num_experts=2, k=4),
                    model=ModelConfig(name="minilm-bundled", layer=3),
                    data=DataConfig(source="lm", dataset="text", data_files=[str(corpus)], streaming=False,
                                    ctx_len=32))
    region, described = heldout_contexts(run, minilm[1], EvalConfig())
    assert described["doc_offset"] == 18
    ids_BT, mask_BT = region.batch(min_tokens=10_000)
    assert ids_BT.shape[0] == 2 and region.batch() is None
    assert "document 18" in minilm[1].decode(ids_BT[0][mask_BT[0].bool()])
    region.restart()
    assert region.batch(max_contexts=1)[0].shape[0] == 1
    # the whole evaluation stops with the region: 2 contexts, embedding measure on the bundled model
    folder = _write_checkpoint(tmp_path / "ckpt", run, 384)
    report = evaluate(folder, batches=5, batch_tokens=8)
    assert report["reconstruction"]["batches"] == 2 and report["data"]["batches_requested"] == 5
    assert report["splice"]["measure"] == "embedding_cosine" and report["splice"]["batches"] == 1
    assert report["splice"]["cosine_zero_ablated"] < report["splice"]["cosine_reconstructed"] < 1


def test_a_cache_run_is_evaluated_on_local_files_given_with_the_command(minilm, tmp_path):
    """A run trained from a cache has no text of its own: --dataset text with --data-files (a glob) and --sample-by
    document make each file one document, all of them held out from --doc-offset 0."""
    for i in range(3):
        (tmp_path / f"held{i}.py").write_text("\n".join(f"def f{i}_{j}(x):\n    return x + {j}" for j in range(4)))
    run = RunConfig(sae=SAEConfig(kind="switch", num_latents=64, num_experts=2, k=4),
                    model=ModelConfig(name="minilm-bundled", layer=3),
                    data=DataConfig(source="cache", cache_dir=str(tmp_path / "no-cache"), ctx_len=128))
    cfg = EvalConfig(dataset="text", data_files=str(tmp_path / "held*.py"), sample_by="document", doc_offset=0)
    region, described = heldout_contexts(run, minilm[1], cfg)
    assert described["data_files"] == [str(tmp_path / "held*.py")]
    ids_BT, mask_BT = region.batch(min_tokens=10_000)
    assert ids_BT.shape[0] == 3, "three files, one document (and one context) each"
    assert "return x + 3" in minilm[1].decode(ids_BT[0][mask_BT[0].bool()]), "a whole file, not one line"


def test_evaluate_command_on_a_trained_synthetic_run(tmp_path, monkeypatch, capsys):
    """Train briefly, evaluate with the CLI: the JSON holds every section, and MSE, FVU, L0 and dead latents equal
    a direct computation on the same held-out batches."""
    run = small_run(tmp_path, steps=20)
    Trainer(run, build_activation_source(run)).train()
    monkeypatch.setattr(sys, "argv", ["evaluate.py", run.trainer.out_dir, "--batches", "3", "--batch-tokens", "500"])
    runpy.run_path(str(ROOT / "launch/evaluate.py"), run_name="__main__")
    out = latest_checkpoint(run.trainer.out_dir) / "eval.json"
    assert str(out) in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert {"checkpoint", "step", "sae", "data", "reconstruction", "experts"} <= report.keys()
    assert "splice" not in report and report["data"]["held_out"] and report["step"] == 20
    rec = report["reconstruction"]
    assert rec["tokens"] == 1500 and rec["batches"] == 3 and len(report["experts"]) == 4

    sae = load_sae(run.trainer.out_dir)
    source = SyntheticSource.from_config(run.data, run.trainer.seed, rank=HELDOUT_RANK)
    x = torch.cat([source.next_batch(500) for _ in range(3)]).double()
    with torch.no_grad():
        out_sae = sae(x.float())
        latents = sae.encode(x.float())
    residual = x - out_sae.x_hat_TD.double()
    assert rec["mse"] == pytest.approx(float(residual.pow(2).sum(1).mean()), rel=1e-6)
    assert rec["fvu"] == pytest.approx(float(residual.var(0, unbiased=False).sum() / x.var(0, unbiased=False).sum()),
                                       rel=1e-6)
    assert rec["l0"] == pytest.approx(float((latents.values_TK > 0).sum(1).double().mean()))
    fired = torch.zeros(run.sae.num_latents, dtype=torch.bool)
    fired[latents.indices_TK[latents.values_TK > 0]] = True
    assert rec["dead_latents"] == int((~fired).sum())
    expert_T = out_sae.routing.expert_T
    for row in report["experts"]:
        rows = expert_T == row["expert"]
        assert row["load"] == pytest.approx(float(rows.double().mean()))
        assert row["mse"] == pytest.approx(float(residual[rows].pow(2).sum(1).mean()), rel=1e-6)


def test_evaluate_command_missing_checkpoint_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["evaluate.py", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "launch/evaluate.py"), run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no SAE checkpoint at") and len(err.strip().splitlines()) == 1
