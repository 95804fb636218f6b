"""The sparse, expert-grouped Switch/TopK SAE equals a naive dense-then-mask implementation of the same math."""

import pytest
import torch

from sae_dist.config import SAEConfig
from sae_dist.models import build_sae
from sae_dist.models.reference import naive_forward


def routed_inputs(d: int, num_experts: int, tokens_per_expert: list[int], seed: int = 0):
    """Tokens that go to chosen experts: router rows are scaled basis vectors; experts listed with 0 get none."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for expert, count in enumerate(tokens_per_expert):
        x = 0.3 * torch.randn(count, d, generator=g)
        x[:, expert] += 6.0
        xs.append(x)
    x_TD = torch.cat(xs)
    return x_TD[torch.randperm(x_TD.shape[0], generator=g)]


def make_switch(num_experts: int, latents: int, k: int, d: int, kind="switch", auxk_alpha=None, dtype=torch.float64):
    cfg = SAEConfig(kind=kind, num_latents=latents, num_experts=num_experts, k=k, auxk_alpha=auxk_alpha, auxk_k=5)
    sae = build_sae(cfg, d_model=d, seed=3).to(dtype)
    with torch.no_grad():
        sae.b_pre.copy_(0.1 * torch.randn(d))
        if sae.router is not None:
            sae.router.weight.zero_()
            sae.router.weight[:, :num_experts] += 4.0 * torch.eye(num_experts)
            sae.router.weight.add_(0.01 * torch.randn_like(sae.router.weight))
        if sae.experts.b_enc is not None:
            sae.experts.b_enc.normal_(0, 0.1)
    return sae


def assert_same_forward_and_grads(sae, x_TD, dead_mask_L=None):
    out = sae(x_TD, dead_mask_L)
    terms = sae.loss_terms(x_TD, out)
    ref_x_hat, ref_f, ref_terms = naive_forward(sae, x_TD, dead_mask_L)
    torch.testing.assert_close(out.x_hat_TD, ref_x_hat, rtol=1e-5, atol=1e-5)
    assert terms.keys() == ref_terms.keys()
    for name in terms:
        torch.testing.assert_close(terms[name], ref_terms[name], rtol=1e-5, atol=1e-6)

    latents = sae.encode(x_TD)
    dense_f = torch.zeros_like(ref_f).scatter_add(1, latents.indices_TK % sae.latents_per_expert, latents.values_TK)
    torch.testing.assert_close(dense_f, ref_f, rtol=1e-5, atol=1e-6)

    weights = sae.loss_weights(0.0)
    loss = sum(weights.get(n, 1.0) * t for n, t in terms.items())
    grads = torch.autograd.grad(loss, list(sae.parameters()))
    ref_loss = sum(weights.get(n, 1.0) * t for n, t in ref_terms.items())
    ref_grads = torch.autograd.grad(ref_loss, list(sae.parameters()))
    for (name, _), g, ref in zip(sae.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    return out


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


def test_dense_topk_with_auxk_matches_naive():
    torch.manual_seed(1)
    sae = make_switch(num_experts=1, latents=32, k=4, d=10, kind="topk")
    assert sae.k_aux == 5 and sae.auxk_alpha == pytest.approx(1 / 32)
    x_TD = torch.randn(9, 10, dtype=torch.float64)
    dead_mask = torch.zeros(32, dtype=torch.bool)
    dead_mask[torch.tensor([0, 3, 4, 9, 17, 30, 31])] = True
    assert_same_forward_and_grads(sae, x_TD, dead_mask)
    # Fewer dead latents than k_aux: the missing selections contribute nothing.
    few_dead = torch.zeros(32, dtype=torch.bool)
    few_dead[5] = True
    assert_same_forward_and_grads(sae, x_TD, few_dead)


def test_switch_auxk_matches_naive():
    torch.manual_seed(2)
    sae = make_switch(num_experts=2, latents=32, k=3, d=8, auxk_alpha=0.5)
    x_TD = routed_inputs(8, 2, [6, 4]).double()
    dead_mask = torch.rand(32, generator=torch.Generator().manual_seed(0)) < 0.5
    assert_same_forward_and_grads(sae, x_TD, dead_mask)


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
