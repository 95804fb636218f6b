"""Auto-interp against a fake OpenAI-compatible server on loopback: explanations stored, balanced accuracy right."""

import torch

from sae_dist.eval.autointerp import (
    AutoInterpConfig,
    balanced_accuracy,
    detection_sample,
    run_autointerp,
    score_detection,
)
from sae_dist.eval.inspect import ActivationRecords
from tests.conftest import EXPLANATION

VOCAB = ["the ", "hot ", "cold ", "tea "]


def make_records(num_active=25, num_inactive=15) -> ActivationRecords:
    """Latent 7 fires (with strength 1..num_active) exactly on the token 'hot'; latent 9 never fires."""
    token_ids, acts = [], []
    for c in range(num_active + num_inactive):
        active = c < num_active
        ids = [0, 1 if active else 2, 3]
        a = torch.zeros(3, 2)
        if active:
            a[1, 0] = float(c + 1)
        token_ids.append(ids)
        acts.append(a)
    return ActivationRecords([7, 9], [0, 1], token_ids, acts, lambda ids: [VOCAB[i] for i in ids])


def config(url, **kw):
    return AutoInterpConfig(base_url=url, model="fake", api_key_env="SAE_DIST_TEST_KEY", explain_contexts=5,
                            quantiles=4, per_quantile=2, negatives=8, excerpts_per_prompt=6, timeout_s=5, **kw)


def test_perfect_scorer_gets_balanced_accuracy_one(fake_endpoint, monkeypatch):
    monkeypatch.setenv("SAE_DIST_TEST_KEY", "secret")
    result = run_autointerp(make_records(), config(fake_endpoint["url"]))
    [latent] = result["latents"]  # latent 9 never fires: not scored
    assert latent["latent"] == 7 and latent["explanation"] == EXPLANATION
    assert latent["balanced_accuracy"] == 1.0 and latent["per_quantile"] == [1.0] * 4
    assert result["mean_balanced_accuracy"] == 1.0
    judged = latent["judged"]
    assert sum(j["quantile"] is None for j in judged) == 8 and sum(j["quantile"] is not None for j in judged) == 8
    path, explain = fake_endpoint["requests"][0]
    assert path == "/v1/chat/completions" and explain["model"] == "fake"
    assert "«hot »" in explain["messages"][1]["content"]  # the explainer sees marked tokens
    assert all("«" not in body["messages"][1]["content"] for _, body in fake_endpoint["requests"][1:])
    assert len(fake_endpoint["requests"]) == 1 + 3  # 16 excerpts in prompts of 6


def test_all_yes_scorer_gets_one_half(fake_endpoint):
    fake_endpoint["mode"] = "all-yes"
    result = run_autointerp(make_records(), config(fake_endpoint["url"]))
    assert result["latents"][0]["balanced_accuracy"] == 0.5
    assert result["latents"][0]["per_quantile"] == [0.5] * 4


def test_detection_sample_is_seeded_and_leaves_out_the_explained_contexts():
    records, cfg = make_records(), config("http://unused")
    sample = detection_sample(records, 7, cfg)
    assert sample == detection_sample(records, 7, cfg)
    assert sample != detection_sample(records, 7, config("http://unused", seed=1))
    top = set(records.top_contexts(7, cfg.explain_contexts))
    assert not top & {c for c, _ in sample}
    # Quantile 0 holds the weakest activating contexts.
    strengths = {q: [c for c, qq in sample if qq == q] for q in range(4)}
    assert max(strengths[0]) < min(strengths[3])


def test_balanced_accuracy_by_hand():
    assert balanced_accuracy([True, False, False, False], [True, True, False, False]) == 0.75
    assert balanced_accuracy([True], [True]) is None
    judged = [{"quantile": 0, "predicted": False}, {"quantile": 1, "predicted": True},
              {"quantile": None, "predicted": False}, {"quantile": None, "predicted": True}]
    scores = score_detection(judged, 2)
    assert scores["balanced_accuracy"] == 0.5 and scores["per_quantile"] == [0.25, 0.75]
