"""sae_dist.activations: a model's activations for a list of texts, the rows the trainer's 'lm' source reads for
the same texts, one tensor per text; with `load_sae` on top as the README shows."""

from __future__ import annotations

import torch

from sae_dist import ActivationSite, activations, load_sae
from sae_dist.data import build_activation_source
from sae_dist.train.trainer import Trainer
from tests.data.test_lm import tiny_run

TEXTS = ["The cat sat on the mat.", "def f(x): return x + 1", " ".join(["word"] * 70), "Switch SAEs route tokens."]


def test_rows_are_the_training_sources_rows_per_text(tiny_gpt2_dir, tmp_path):
    text_file = tmp_path / "texts.txt"
    text_file.write_text("\n".join(TEXTS) + "\n")
    run = tiny_run(tiny_gpt2_dir, dataset="text", data_files=[str(text_file)], prefetch=0, ctx_len=16)
    per_text = activations(TEXTS, model="tiny", layer=1, path=str(tiny_gpt2_dir), ctx_len=16, batch_size=3)
    assert [x.shape[1] for x in per_text] == [64] * len(TEXTS) and all(x.dtype == torch.float32 for x in per_text)
    ours_ND = torch.cat(per_text)
    source = build_activation_source(run)
    theirs_ND = source.next_batch(4 * ours_ND.shape[0])  # a few epochs of the file, shuffled
    # Every row of ours has an exact twin among the source's, and every source row is one of ours.
    distance = torch.cdist(ours_ND, theirs_ND, compute_mode="donot_use_mm_for_euclid_dist")
    assert distance.min(dim=1).values.max() < 1e-5 and distance.min(dim=0).values.max() < 1e-5
    assert per_text[2].shape[0] > 16  # a text longer than one context keeps all its contexts


def test_activations_of_the_site_an_sae_was_trained_on_feed_it(tiny_gpt2_dir, tmp_path):
    run = tiny_run(tiny_gpt2_dir, prefetch=0)
    run.sae.num_latents, run.sae.num_experts, run.sae.k = 128, 2, 4
    run.trainer.batch_size, run.trainer.steps, run.trainer.out_dir = 64, 2, str(tmp_path / "run")
    run.trainer.progress, run.trainer.tensorboard = False, False
    Trainer(run, build_activation_source(run)).train()
    site = ActivationSite.of_sae(run.trainer.out_dir)
    assert (site.ctx_len, site.d_model) == (run.data.ctx_len, 64)
    sae = load_sae(run.trainer.out_dir)
    x_TD = site(TEXTS[:1])[0]
    latents = sae.encode(x_TD)
    assert latents.values_TK.shape == (x_TD.shape[0], 4)
    assert torch.allclose(sae.decode(latents), sae(x_TD).x_hat_TD, atol=1e-5)
