"""The SAE contract: every registered kind builds by name, exposes SAELens-style views of its parameters, and
declares which state it shards over experts (the gradient sync asks the model, not a parameter name)."""

import pytest
import torch

from sae_dist.config import ConfigError, SAEConfig
from sae_dist.models import SAE, architecture, architecture_names, build_sae
from sae_dist.parallel.expert_parallel import split_gradients


def config_for(kind: str) -> SAEConfig:
    return SAEConfig(kind=kind, num_latents=32, num_experts=4 if architecture(kind).routed else 1, k=4)


@pytest.mark.parametrize("kind", architecture_names())
def test_every_kind_builds_by_name_with_views_of_its_parameters(kind):
    sae = build_sae(config_for(kind), 8, seed=0)
    assert isinstance(sae, architecture(kind)) and isinstance(sae, SAE) and sae.kind == kind
    assert (sae.d_in, sae.d_sae) == (8, 32)
    assert sae.W_enc.shape == (8, 32) and sae.W_dec.shape == (32, 8) and sae.b_dec.shape == (8,)
    with torch.no_grad():  # views: a change of the parameter shows through
        for p in sae.decoder_weights():
            p.mul_(2)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((32,), 2.0))
    x_TD = torch.randn(5, 8)
    latents = sae.encode(x_TD)
    assert torch.allclose(sae.decode(latents), sae(x_TD).x_hat_TD, atol=1e-5)


def test_unknown_kind_is_one_line_naming_the_registered_kinds():
    with pytest.raises(ConfigError, match=r"^sae.kind='gated' is unknown; allowed: switch, topk, relu") as info:
        build_sae(SAEConfig(kind="gated"), 8, seed=0)
    assert "\n" not in str(info.value)


def test_gradient_sync_takes_the_experts_the_model_declares():
    sae = build_sae(config_for("switch"), 8, seed=0)
    sae(torch.randn(6, 8)).x_hat_TD.sum().backward()
    replicated, experts = split_gradients(sae)
    assert {id(g) for g in experts} == {id(sae.experts.w_enc.grad), id(sae.experts.w_dec.grad)}

    class RouterSharded(type(sae)):  # a model may declare any entry, whatever its name
        def expert_sharded(self):
            return frozenset({"router.weight"})

    sae.__class__ = RouterSharded
    replicated, experts = split_gradients(sae)
    assert [id(g) for g in experts] == [id(sae.router.weight.grad)]
