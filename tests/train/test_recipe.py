"""The recipe options (trainer.lr_rule, sae.dead_count) equal their straightforward definitions, and are checked at
start-up. Expert parallelism with them: tests/parallel (training_recipe_P2)."""

from __future__ import annotations

import math

import pytest
import torch

from sae_dist.config import ConfigError, SAEConfig
from sae_dist.data import build_activation_source
from sae_dist.models.base import default_lr
from sae_dist.train.optim import build_optimizer
from sae_dist.train.trainer import Trainer
from sae_dist.validation import validate
from tests.conftest import small_run


def test_lr_rule_by_total_or_expert_width(tmp_path):
    sae = SAEConfig(kind="switch", num_latents=2**17, num_experts=8)
    assert default_lr(sae) == pytest.approx(2e-4 / math.sqrt(8))
    assert default_lr(sae, "expert") == pytest.approx(2e-4)
    topk = SAEConfig(kind="topk", num_latents=2**16, num_experts=1)
    assert default_lr(topk, "expert") == default_lr(topk) == pytest.approx(1e-4)
    run = small_run(tmp_path, lr=None, lr_rule="expert")
    layer = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(layer, run, [{"params": list(layer.parameters())}])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-4 / math.sqrt(run.sae.num_latents / 4 / 2**14))


def reference_counters(counters_L: torch.Tensor, out, num_experts: int, batch: int, routed: bool) -> torch.Tensor:
    """Tokens since each latent fired, advanced by one step straight from the definition."""
    width = counters_L.numel() // num_experts
    fired_L = torch.zeros_like(counters_L, dtype=torch.bool)
    fired_L[out.latent_indices_RK[out.latent_values_RK > 0]] = True
    if routed:
        routed_N = torch.tensor([(out.routing.expert_TE == e).sum() for e in range(num_experts)])  # all e picks
        added_L = torch.cat([routed_N[e].repeat(width) for e in range(num_experts)])
    else:
        added_L = torch.full_like(counters_L, batch)
    return torch.where(fired_L, torch.zeros_like(counters_L), counters_L + added_L)


@pytest.mark.parametrize(("dead_count", "experts_per_token"), [("tokens", 1), ("routed", 1), ("routed", 2)])
def test_dead_counters_and_auxk_candidates_follow_the_definition(tmp_path, dead_count, experts_per_token):
    """Every step's counters equal the reference; with AuxK on, the latents it draws on are exactly the ones the
    reference counters call dead (dead_tokens below one batch: latents die within the run under both counts).
    Under top-2 routing a token counts for both experts it reaches."""
    run = small_run(tmp_path, batch_size=64)
    run.sae.dead_count, run.sae.auxk_alpha, run.sae.dead_tokens = dead_count, 1 / 32, 48
    run.sae.experts_per_token = experts_per_token
    validate(run)
    trainer = Trainer(run, build_activation_source(run))
    source = build_activation_source(run)
    expected_L = torch.zeros(run.sae.num_latents, dtype=torch.long)
    saw_dead = False
    for step in range(12):
        x_TD = source.next_batch(64)
        if step == 0:
            trainer._init_biases(x_TD)
        dead_L = expected_L >= run.sae.dead_tokens
        candidates = trainer.latents.aux_candidates(trainer.tokens)
        if dead_L.any():
            saw_dead = True
            chosen_L = torch.zeros_like(dead_L)
            ids_NC = candidates.ids_NC + torch.arange(run.sae.num_experts)[:, None] * (run.sae.num_latents // 4)
            chosen_L[ids_NC[candidates.dead_NC]] = True
            assert torch.equal(chosen_L, dead_L)
        result = trainer.train_step(x_TD)
        trainer.step += 1
        trainer.tokens += 64
        expected_L = reference_counters(expected_L, result.out, run.sae.num_experts, 64, dead_count == "routed")
        assert torch.equal(trainer.dead.tokens_since_fired_L, expected_L)
    assert saw_dead


def test_recipe_options_are_validated(tmp_path):
    run = small_run(tmp_path, kind="topk")
    run.sae.dead_count = "routed"
    with pytest.raises(ConfigError, match="sae.dead_count='routed' applies to routed SAEs only"):
        validate(run)
    run = small_run(tmp_path)
    run.sae.dead_count = "expert"
    with pytest.raises(ConfigError, match="sae.dead_count='expert' is unknown; allowed: tokens, routed"):
        validate(run)
    with pytest.raises(ConfigError, match="trainer.lr_rule='experts' is unknown; allowed: total, expert"):
        small_run(tmp_path, lr_rule="experts")
