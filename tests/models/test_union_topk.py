"""Union TopK (sae.union_topk): one TopK over the union of a token's e experts' gated activations equals the dense
oracle (all experts on every token, masked to the chosen ones, gated, torch.topk over the union) in the forward,
losses, encode/decode and every gradient, for both formulations, and in the trainer's full steps."""

import pytest
import torch
from model_helpers import assert_same_forward_and_grads, routed_inputs, top_e_switch
from test_formulations import FORMULATIONS

from sae_dist.config import ConfigError
from sae_dist.models.routing import LocalDispatcher
from sae_dist.models.selection import union_topk_mask
from sae_dist.validation import validate
from tests.conftest import small_run


def union_switch(experts_per_token: int, **kwargs):
    """`top_e_switch` with union TopK and a router soft enough that a token's later experts win some of its k."""
    sae = top_e_switch(experts_per_token, True, **kwargs)
    with torch.no_grad():
        sae.router.weight.mul_(0.3)
    return sae


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("experts_per_token", [2, 4])
def test_union_topk_matches_the_dense_oracle(experts_per_token, formulation, dtype):
    """AuxK on half the latents dead; expert 2 is no token's first choice; e = N runs every expert on every token.
    k per token in all, drawn from several experts: not each expert's own k."""
    torch.manual_seed(0)
    sae = union_switch(experts_per_token, num_experts=4, latents=64, k=3, d=12, auxk_alpha=0.5, dtype=dtype,
                       formulation=formulation)
    x_TD = routed_inputs(12, 4, [7, 1, 0, 12]).to(dtype)
    dead_L = torch.rand(64, generator=torch.Generator().manual_seed(1)) < 0.5
    out = assert_same_forward_and_grads(sae, x_TD, dead_L, grad_atol=1e-5)
    assert out.routing.gate_TE[:, 1].min() > 0.05, "expected second experts that matter"
    latents = sae.encode(x_TD)
    assert latents.values_TK.shape == (20, 3)
    positive_TK = latents.values_TK > 0
    assert int(sae.active_latents(out)) == int(positive_TK.sum())  # the dropped candidates are not active
    mixed = (latents.indices_TK // 16 != out.routing.expert_T[:, None]) & positive_TK
    assert mixed.any() and (~mixed & positive_TK).any(), "expected latents of first and of later experts"
    torch.testing.assert_close(sae.decode(latents), out.x_hat_TD, rtol=1e-5, atol=1e-5)
    fired_L = torch.zeros(64, dtype=torch.bool)
    fired_L[latents.indices_TK[positive_TK]] = True
    assert torch.equal(sae.fired_latents(out), fired_L)


def test_union_topk_handles_no_tokens_and_empty_experts():
    sae = union_switch(2, num_experts=2, latents=16, k=4, d=8, dtype=torch.float32)
    assert_same_forward_and_grads(sae, routed_inputs(8, 2, [0, 5]).float())
    assert sae(torch.zeros(0, 8)).x_hat_TD.shape == (0, 8)
    assert sae.encode(torch.zeros(0, 8)).values_TK.shape == (0, 4)


def test_union_topk_mask_is_topk_of_the_gated_union_and_never_picks_dropped_rows():
    """Two tokens, e = 2, k = 2; token 1's second row was dropped by a capacity limit (its candidates are the zeros
    that combine returns), so its union holds its first row's candidates only, zeros included."""
    values_SK = torch.tensor([[3.0, 1.0], [2.0, 1.5], [0.5, 0.0], [0.0, 0.0]])
    gate_TE = torch.tensor([[0.5, 0.4], [0.6, 0.3]])
    kept_S = torch.tensor([True, True, True, False])
    keep_SK = union_topk_mask(values_SK, gate_TE, kept_S, 2)
    # Token 0: 1.5, 0.5 | 0.8, 0.6 -> 1.5 and 0.8. Token 1: 0.3, 0 | dropped -> its own two.
    assert keep_SK.tolist() == [[True, False], [True, False], [True, True], [False, False]]


def test_dispatch_like_is_the_forward_of_combine():
    dispatcher = LocalDispatcher(3)
    x_TD = torch.randn(7, 2)
    rows_RD, plan = dispatcher.dispatch(x_TD, torch.tensor([2, 0, 1, 0, 2, 2, 1]))
    assert torch.equal(dispatcher.dispatch_like(x_TD, plan), rows_RD)
    assert torch.equal(dispatcher.combine(dispatcher.dispatch_like(x_TD, plan), plan), x_TD)


@pytest.mark.parametrize(
    "kind, experts_per_token, a2a_chunks, message",
    [
        ("switch", 1, 1, "sae.union_topk=true selects over the union of a token's experts: it needs "
                         r"sae.experts_per_token > 1 \(a Switch SAE\); use false"),
        ("topk", 1, 1, "sae.union_topk=true selects over the union"),
        ("batchtopk", 1, 1, "sae.union_topk=true: sae.kind='batchtopk' selects per expert over its batch; use false"),
        ("switch", 2, 3, "parallel.a2a_chunks=3: sae.union_topk=true exchanges every row's candidates"),
    ],
)
def test_bad_union_topk_gives_one_line_errors(tmp_path, kind, experts_per_token, a2a_chunks, message):
    run = small_run(tmp_path, kind=kind)
    run.sae.experts_per_token, run.sae.union_topk, run.parallel.a2a_chunks = experts_per_token, True, a2a_chunks
    with pytest.raises(ConfigError, match=message) as info:
        validate(run)
    assert "\n" not in str(info.value)


def test_dispatch_and_combine_gradients_equal_indexing():
    """The dispatcher's row permutations back-propagate by a gather with the inverse permutation: the same
    gradients as indexing's scatter-add."""
    dispatcher = LocalDispatcher(3)
    x_TD = torch.randn(7, 2, requires_grad=True)
    expert_T = torch.tensor([2, 0, 1, 0, 2, 2, 1])
    upstream_TD = torch.randn(7, 2)
    rows_RD, plan = dispatcher.dispatch(x_TD, expert_T)
    scale_RD = torch.arange(14.0).view(7, 2)  # a row-dependent op between the permutations
    (dispatcher.combine(rows_RD * scale_RD, plan) * upstream_TD).sum().backward()
    order_T = torch.argsort(expert_T, stable=True)
    expected_TD = (scale_RD * upstream_TD[order_T])[torch.argsort(order_T)]
    torch.testing.assert_close(x_TD.grad, expected_TD, rtol=0, atol=0)
