"""The SAEBench form of every kind (`sae_dist.interop.saebench`): SAEBench's attributes and shapes, unit-norm decoder
rows, and a linear decode of the dense latents equal to the SAE's own forward reconstruction."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sae_dist import load_sae
from sae_dist.data import build_activation_source
from sae_dist.interop.saebench import load_saebench_sae
from sae_dist.train.trainer import Trainer
from sae_dist.validation import validate
from tests.conftest import small_run

RUNS = {"switch": ("switch", 4, 1), "switch_top2": ("switch", 4, 2), "topk": ("topk", 1, 1),
        "batchtopk": ("batchtopk", 4, 1), "relu": ("relu", 1, 1)}
"""Run name -> (sae.kind, N, experts per token)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A few trained steps of each kind: biases off zero, decoders renormalised, BatchTopK thresholds set."""
    out = {}
    for name, (kind, experts, per_token) in RUNS.items():
        run = small_run(tmp_path_factory.mktemp(name), kind=kind, steps=4, checkpoint_every=4, log_every=4)
        run = replace(run, sae=replace(run.sae, num_experts=experts, experts_per_token=per_token))
        validate(run)
        Trainer(run, build_activation_source(run)).train()
        out[name] = run
    return out


def batch(run, tokens=64):
    return build_activation_source(run).next_batch(tokens)


@pytest.mark.parametrize("name", list(RUNS))
def test_the_saebench_form_has_the_interface_and_reconstructs_as_the_sae(name, runs):
    run = runs[name]
    flat = load_saebench_sae(run.trainer.out_dir, model_name="gpt2")
    d, m = run.data.d_model, run.sae.num_latents
    assert (flat.W_enc.shape, flat.W_dec.shape, flat.b_enc.shape, flat.b_dec.shape) == ((d, m), (m, d), (m,), (d,))
    cfg = flat.cfg
    assert (cfg.d_in, cfg.d_sae, cfg.model_name, cfg.architecture) == (d, m, "gpt2", run.sae.kind)
    assert (cfg.hook_name, cfg.hook_layer, cfg.context_size) == (
        f"blocks.{run.model.layer}.hook_resid_post", run.model.layer, run.data.ctx_len)
    assert cfg.to_dict()["dtype"] == "float32" and flat.dtype == torch.float32
    assert flat.device == torch.device("cpu") and cfg.device == "cpu"
    torch.testing.assert_close(flat.W_dec.norm(dim=1), torch.ones(m), atol=1e-5, rtol=0)
    assert flat.check_decoder_norms()

    sae = load_sae(run.trainer.out_dir)
    x_TD = batch(run)
    f_TM = flat.encode(x_TD)
    assert f_TM.shape == (64, m) and (f_TM >= 0).all()
    forward_TD = sae(x_TD).x_hat_TD
    torch.testing.assert_close(flat.decode(f_TM), forward_TD, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f_TM @ flat.W_dec + flat.b_dec, forward_TD, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat(x_TD), forward_TD, atol=1e-5, rtol=1e-5)
    if run.sae.kind != "relu":
        active = (f_TM > 0).sum(1)
        if run.sae.kind == "batchtopk":
            assert active.float().mean() > 0
        else:
            assert (active <= run.sae.k * run.sae.experts_per_token).all() and (active > 0).all()
    if run.sae.num_experts > 1:  # the latents sit in the chosen experts' columns only, gated by p_e
        routing = sae.router(x_TD)
        in_expert_TN = (f_TM > 0).unflatten(1, (run.sae.num_experts, -1)).any(2)
        chosen_TN = torch.zeros_like(in_expert_TN).scatter_(1, routing.expert_TE, True)
        assert not (in_expert_TN & ~chosen_TN).any()


def test_the_saebench_form_takes_sequences_and_hands_back_the_dtype_asked_for(runs):
    run = runs["switch"]
    flat = load_saebench_sae(run.trainer.out_dir)
    x_BLD = batch(run).reshape(4, 16, -1)
    reference_BLD = flat(x_BLD)
    assert reference_BLD.shape == x_BLD.shape and flat.encode(x_BLD).shape == (4, 16, run.sae.num_latents)
    assert flat.to(device="cpu", dtype=torch.bfloat16) is flat
    assert flat.dtype == torch.bfloat16 and flat.cfg.dtype == "bfloat16"
    assert flat.W_dec.dtype == torch.float32  # the weights stay float32; only what is handed back changes
    out_BLD = flat(x_BLD.bfloat16())
    assert out_BLD.dtype == torch.bfloat16
    torch.testing.assert_close(out_BLD.float(), reference_BLD, atol=0.1, rtol=0.02)
