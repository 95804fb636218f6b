"""The recipe group: `recipe=paper` is the schema's defaults (so the paper's experiments train as before the group
existed), the recommended recipe sets what docs/configuration.md says, and ReLU trains alike under both."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hydra_compose import CONF, compose_config, compose_run
from omegaconf import OmegaConf

from sae_dist.config import ConfigError, SAEConfig, TrainerConfig
from sae_dist.models.base import build_sae

PAPER_EXPERIMENTS = ["switch_65k", "topk_65k", "relu_65k",
                     *(f"paper/{p.stem}" for p in sorted((CONF / "experiment/paper").glob("*.yaml")))]
RECIPE_KEYS = {"trainer": ("lr_rule",), "sae": ("auxk_alpha", "auxk_scale", "dead_count", "resample_every")}


def composed(overrides: list[str]) -> dict:
    return OmegaConf.to_container(compose_config(overrides), resolve=False)


@pytest.mark.parametrize("base", [[], ["sae=topk"], ["sae=relu"], *([f"+experiment={e}"] for e in PAPER_EXPERIMENTS)])
def test_the_paper_recipe_composes_to_the_config_without_the_group(base):
    """`~recipe` drops the group from the defaults list: what the configs composed to before it existed."""
    assert composed([*base, "recipe=paper"]) == composed([*base, "~recipe"])


def test_the_paper_recipe_is_the_schemas_defaults():
    run = compose_run(["recipe=paper"])
    for group, keys in RECIPE_KEYS.items():
        schema = {"trainer": TrainerConfig(), "sae": SAEConfig()}[group]
        for key in keys:
            assert getattr(getattr(run, group), key) == getattr(schema, key), f"{group}.{key}"


@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_the_papers_experiments_select_the_paper_recipe(experiment):
    assert composed([f"+experiment={experiment}"]) == composed([f"+experiment={experiment}", "recipe=paper"])


@pytest.mark.parametrize("base", [[], ["+experiment=quickstart"], ["sae=topk"],
                                  ["+experiment=switch_65k", "recipe=expert_lr_auxk_gao"]])
def test_the_recommended_recipe_sets_the_expert_lr_and_gao_scaled_auxk(base):
    run = compose_run(base)
    assert run.trainer.lr_rule == "expert"
    assert (run.sae.auxk_alpha, run.sae.auxk_scale) == (1 / 32, "gao")
    assert (run.sae.dead_count, run.sae.resample_every) == ("tokens", None)


def test_the_recommended_recipe_refuses_batchtopk_in_one_line():
    with pytest.raises(ConfigError, match="sae.auxk_alpha=0.03125: sae.kind='batchtopk' has no AuxK"):
        compose_run(["sae.kind=batchtopk"])
    assert compose_run(["recipe=paper", "sae.kind=batchtopk"]).sae.kind == "batchtopk"


def test_relu_trains_alike_under_both_recipes():
    """ReLU reads none of the recipe's keys: the same lr, loss terms, weights and gradients under either."""
    from sae_dist.models.base import default_lr

    runs = [compose_run(["sae=relu", "sae.num_latents=64", f"recipe={r}"]) for r in ("paper", "expert_lr_auxk_gao")]
    assert runs[0].sae != runs[1].sae  # the recipes do differ in the keys they set
    assert default_lr(runs[0].sae, runs[0].trainer.lr_rule) == default_lr(runs[1].sae, runs[1].trainer.lr_rule)
    x_TD = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    results = []
    for run in runs:
        sae = build_sae(run.sae, d_model=16, seed=0)
        out = sae(x_TD)
        terms = sae.loss_terms(x_TD, out)
        weights = sae.loss_weights(0.5)
        loss = sum(weights.get(name, 1.0) * value for name, value in terms.items())
        loss.backward()
        results.append((terms, weights, {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (terms_a, weights_a, grads_a), (terms_b, weights_b, grads_b) = results
    assert weights_a == weights_b and terms_a.keys() == terms_b.keys()
    assert all(torch.equal(terms_a[n], terms_b[n]) for n in terms_a)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def test_the_recipe_keys_are_the_schema_fields_they_name():
    fields = {"trainer": {f.name for f in dataclasses.fields(TrainerConfig)},
              "sae": {f.name for f in dataclasses.fields(SAEConfig)}}
    for recipe in ("paper", "expert_lr_auxk_gao"):
        values = OmegaConf.to_container(OmegaConf.load(CONF / "recipe" / f"{recipe}.yaml"))
        assert {group: set(keys) for group, keys in values.items()} == \
            {group: set(keys) for group, keys in RECIPE_KEYS.items()}
        for group, keys in values.items():
            assert set(keys) <= fields[group]
