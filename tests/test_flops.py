import pytest

from sae_dist.config import SAEConfig
from sae_dist.flops import flops_per_token, training_flops


def test_paper_encoder_count_matches_spec():
    d = 768
    dense = flops_per_token(SAEConfig(kind="topk", num_latents=24576, num_experts=1, k=32), d)
    switch = flops_per_token(SAEConfig(kind="switch", num_latents=24576 * 8, num_experts=8, k=32), d)
    assert dense.encoder_paper == 4 * 24576 * 768
    # FLOP-matched: 8 experts of 24576 latents cost the encoder of one dense 24576-latent SAE
    assert switch.encoder_paper == dense.encoder_paper


def test_complete_count_by_hand():
    d, m, n, k = 10, 40, 4, 3
    f = flops_per_token(SAEConfig(kind="switch", num_latents=m, num_experts=n, k=k), d)
    router = 2 * n * d + n
    assert f.forward == router + 2 * (m // n) * d + (m // n) + 2 * k * d
    assert f.backward == 2 * router + 8 * k * d
    relu = flops_per_token(SAEConfig(kind="relu", num_latents=m, num_experts=1), d)
    assert (relu.forward, relu.backward) == (4 * m * d + m, 8 * m * d)
    assert training_flops(SAEConfig(kind="relu", num_latents=m, num_experts=1), d, 5)["complete"] == pytest.approx(
        5 * relu.total
    )


def test_switch_is_cheaper_than_dense_of_same_width():
    d = 768
    dense = flops_per_token(SAEConfig(kind="topk", num_latents=65536, num_experts=1, k=32), d)
    switch = flops_per_token(SAEConfig(kind="switch", num_latents=65536, num_experts=8, k=32), d)
    assert switch.total < dense.total / 4
