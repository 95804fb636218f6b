"""The sparse, expert-grouped Switch/TopK SAE equals a naive dense-then-mask implementation of the same math."""

import pytest
import torch
from model_helpers import assert_same_forward_and_grads, make_switch, routed_inputs

from sae_dist.models.auxk import dead_candidates


@pytest.mark.parametrize("k", [3, 16])  # 16 = all latents of an expert: most selections are not positive
def test_switch_matches_naive_with_an_empty_expert(k):
    torch.manual_seed(0)
    sae = make_switch(num_experts=4, latents=64, k=k, d=12)
    x_TD = routed_inputs(12, 4, [7, 1, 0, 12]).double()
    out = assert_same_forward_and_grads(sae, x_TD)
    assert torch.bincount(out.routing.expert_T, minlength=4).tolist() == [7, 1, 0, 12]
    if k == 16:
        assert (out.latent_values_RK == 0).any(), "expected fewer positive pre-activations than k"


def test_switch_decoder_gradient_flows_through_gate_only_for_router():
    sae = make_switch(num_experts=2, latents=16, k=2, d=6)
    x_TD = routed_inputs(6, 2, [5, 3]).double()
    out = sae(x_TD)
    loss = sae.loss_terms(x_TD, out)["rec"]
    loss.backward()
    assert sae.router.weight.grad.abs().sum() > 0
    assert sae.router.b_router.grad.abs().sum() > 0


@pytest.mark.parametrize("scale", ["x_variance", "gao"])
def test_dense_topk_with_auxk_matches_naive(scale):
    torch.manual_seed(1)
    sae = make_switch(num_experts=1, latents=32, k=4, d=10, kind="topk")
    sae.cfg.auxk_scale = scale
    assert sae.k_aux == 5 and sae.auxk_alpha == pytest.approx(1 / 32)
    x_TD = torch.randn(9, 10, dtype=torch.float64)
    dead_mask = torch.zeros(32, dtype=torch.bool)
    dead_mask[torch.tensor([0, 3, 4, 9, 17, 30, 31])] = True
    assert_same_forward_and_grads(sae, x_TD, dead_mask)
    # Fewer dead latents than k_aux: the missing selections contribute nothing.
    few_dead = torch.zeros(32, dtype=torch.bool)
    few_dead[5] = True
    assert_same_forward_and_grads(sae, x_TD, few_dead)


@pytest.mark.parametrize("scale", ["x_variance", "gao"])
def test_switch_auxk_matches_naive(scale):
    torch.manual_seed(2)
    sae = make_switch(num_experts=2, latents=32, k=3, d=8, auxk_alpha=0.5)
    sae.cfg.auxk_scale = scale
    x_TD = routed_inputs(8, 2, [6, 4]).double()
    dead_mask = torch.rand(32, generator=torch.Generator().manual_seed(0)) < 0.5
    assert_same_forward_and_grads(sae, x_TD, dead_mask)


@pytest.mark.parametrize("kind", ["topk", "switch"])
def test_gao_auxk_scale_is_the_normalised_aux_error_in_mse_units(kind):
    """'gao': alpha weighs MSE_aux / Var(e) against MSE / Var(x) (Gao et al.'s loss), here times Var(x), with
    MSE and Var the per-token means of sums over dims (torch.var, not the oracle's sums)."""
    torch.manual_seed(3)
    sae = make_switch(num_experts=2 if kind == "switch" else 1, latents=32, k=3, d=8, kind=kind, auxk_alpha=0.5)
    x_TD = routed_inputs(8, 2, [6, 4]).double()
    dead_mask = torch.rand(32, generator=torch.Generator().manual_seed(1)) < 0.5
    out = sae(x_TD, aux_candidates=dead_candidates(dead_mask, sae.num_local_experts))
    spec = sae.loss_terms(x_TD, out)["auxk"]
    sae.cfg.auxk_scale = "gao"
    gao = sae.loss_terms(x_TD, out)["auxk"]
    e_TD = (x_TD - out.x_hat_TD).detach()
    mse_aux = (out.aux_recon_TD - e_TD).pow(2).sum(1).mean()
    var_x, var_e = x_TD.var(0, unbiased=False).sum(), e_TD.var(0, unbiased=False).sum()
    torch.testing.assert_close(gao, (mse_aux / var_e * var_x).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(spec, (mse_aux / var_x).float(), rtol=1e-6, atol=0)  # the x_variance scale's, for contrast
    assert gao > 10 * spec


def test_float32_model_matches_naive_and_handles_no_tokens():
    sae = make_switch(num_experts=2, latents=16, k=4, d=8, dtype=torch.float32)
    x_TD = routed_inputs(8, 2, [0, 5]).float()
    assert_same_forward_and_grads(sae, x_TD)
    empty = sae(torch.zeros(0, 8))
    assert empty.x_hat_TD.shape == (0, 8)


def test_experts_start_identical_whatever_the_layout():
    """Expert e's weights depend on (seed, e) only, not on which experts a device holds."""
    from sae_dist.models.experts import ExpertBank

    full = ExpertBank(num_local=4, latents_per_expert=8, d_model=6, encoder_bias=False, seed=7)
    half = ExpertBank(num_local=2, latents_per_expert=8, d_model=6, encoder_bias=False, seed=7, first_expert=2)
    torch.testing.assert_close(full.w_enc[2:], half.w_enc, rtol=0, atol=0)
    torch.testing.assert_close(full.w_dec.norm(dim=-1), torch.ones(4, 8))
