"""Top-e routing (sae.experts_per_token): each token's e most probable experts, outputs weighted by their
probabilities, equal the dense oracle (forward, losses, encode, every gradient) and the straightforward trainer step."""

import copy

import pytest
import torch
from model_helpers import assert_same_forward_and_grads, routed_inputs, top_e_switch

from sae_dist.config import ConfigError, SAEConfig
from sae_dist.data import build_activation_source
from sae_dist.flops import flops_per_token
from sae_dist.train.latents import DeadLatentTracker
from sae_dist.train.trainer import Trainer
from sae_dist.validation import validate
from tests.conftest import small_run
from tests.reference import reference_train_step
from tests.train.test_step import assert_same_weights


@pytest.mark.parametrize("experts_per_token", [2, 4])
def test_top_e_matches_naive_with_an_empty_expert(experts_per_token):
    """Expert 2 is no token's first choice (some tokens' second); with e = N every expert runs on every token."""
    torch.manual_seed(0)
    sae = top_e_switch(experts_per_token, num_experts=4, latents=64, k=3, d=12)
    x_TD = routed_inputs(12, 4, [7, 1, 0, 12]).double()
    out = assert_same_forward_and_grads(sae, x_TD)
    assert out.routing.expert_TE.shape == (20, experts_per_token)
    assert out.latent_values_RK.shape[0] == 20 * experts_per_token
    assert torch.bincount(out.routing.expert_T, minlength=4).tolist() == [7, 1, 0, 12]
    assert out.routing.gate_TE[:, 1].min() > 0.05, "expected second experts that matter"
    top1 = copy.deepcopy(sae)
    top1.cfg.experts_per_token = top1.router.experts_per_token = 1
    assert not torch.allclose(top1(x_TD).x_hat_TD, out.x_hat_TD, atol=1e-6)


def test_top_e_auxk_matches_naive_and_encode_decodes_to_x_hat():
    torch.manual_seed(2)
    sae = top_e_switch(2, num_experts=3, latents=48, k=3, d=8, auxk_alpha=0.5)
    x_TD = torch.randn(11, 8, dtype=torch.float64)
    dead_mask = torch.rand(48, generator=torch.Generator().manual_seed(0)) < 0.5
    out = assert_same_forward_and_grads(sae, x_TD, dead_mask)
    latents = sae.encode(x_TD)
    assert latents.indices_TK.shape == (11, 2 * 3)
    # The first k ids lie in each token's most probable expert, the next k in its second.
    first_TK, second_TK = latents.indices_TK.split(3, dim=1)
    assert torch.equal(first_TK // 16, out.routing.expert_TE[:, :1].expand(-1, 3))
    assert torch.equal(second_TK // 16, out.routing.expert_TE[:, 1:].expand(-1, 3))
    torch.testing.assert_close(sae.decode(latents), out.x_hat_TD, rtol=1e-6, atol=1e-6)  # float32 gates


def test_top_e_float32_handles_no_tokens():
    sae = top_e_switch(2, num_experts=2, latents=16, k=4, d=8, dtype=torch.float32)
    assert_same_forward_and_grads(sae, routed_inputs(8, 2, [0, 5]).float())
    assert sae(torch.zeros(0, 8)).x_hat_TD.shape == (0, 8)
    assert sae.encode(torch.zeros(0, 8)).values_TK.shape == (0, 8)


@pytest.mark.parametrize("union_topk", [False, True])
def test_trainer_steps_with_top2_routing_equal_reference_steps(tmp_path, union_topk):
    """Six steps of the fused trainer (AuxK on from the third) equal the straightforward step on the oracle, with each
    expert's own TopK or one TopK over the union (sae.union_topk)."""
    batch = 64
    run = small_run(tmp_path, kind="switch", batch_size=batch, steps=1000, lr=1e-3, grad_clip=0.7)
    run.sae.experts_per_token, run.sae.dead_tokens, run.sae.auxk_alpha = 2, 2 * batch, 0.5
    run.sae.union_topk = union_topk
    trainer = Trainer(run, build_activation_source(run))
    source = build_activation_source(run)
    reference = copy.deepcopy(trainer.model)
    cfg = run.trainer
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                     foreach=False)
    ref_dead = DeadLatentTracker(trainer.model.num_local_latents, run.sae.dead_tokens)
    for step in range(6):
        x_TD = source.next_batch(batch)
        result = trainer.train_step(x_TD)
        dead_mask_L = ref_dead.dead_mask() if step * batch >= run.sae.dead_tokens else None
        ref_loss, f_TL = reference_train_step(reference, ref_optimizer, x_TD, cfg.grad_clip, dead_mask_L)
        ref_dead.update((f_TL > 0).any(0), batch)
        assert torch.equal(trainer.dead.tokens_since_fired_L, ref_dead.tokens_since_fired_L)
        torch.testing.assert_close(result.loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert ("auxk" in result.terms) == (dead_mask_L is not None)
        assert_same_weights(trainer.model, reference, {"rtol": 1e-4, "atol": 1e-6})
    row = trainer.step_metrics(x_TD, result)
    assert sum(row["expert_load"]) == pytest.approx(1.0)


def test_flops_count_every_chosen_expert():
    d, m, n, k = 10, 40, 4, 3
    one = flops_per_token(SAEConfig(kind="switch", num_latents=m, num_experts=n, k=k), d)
    two = flops_per_token(SAEConfig(kind="switch", num_latents=m, num_experts=n, k=k, experts_per_token=2), d)
    router = 2 * n * d + n
    assert two.forward - router == 2 * (one.forward - router)
    assert two.backward - 2 * router == 2 * (one.backward - 2 * router)
    assert two.encoder_paper == 2 * one.encoder_paper


@pytest.mark.parametrize(
    "kind, num_experts, experts_per_token, message",
    [
        ("switch", 4, 0, "sae.experts_per_token=0 must be positive"),
        ("switch", 4, 5, r"sae.experts_per_token=5 must be in \[1, sae.num_experts=4\]"),
        ("topk", 1, 2, "sae.experts_per_token=2 must be 1 for sae.kind='topk'"),
        ("batchtopk", 4, 2, "sae.experts_per_token=2: sae.kind='batchtopk' routes each token to one expert"),
    ],
)
def test_bad_experts_per_token_gives_one_line_errors(tmp_path, kind, num_experts, experts_per_token, message):
    run = small_run(tmp_path, kind=kind)
    run.sae.num_experts, run.sae.experts_per_token = num_experts, experts_per_token
    with pytest.raises(ConfigError, match=message) as info:
        validate(run)
    assert "\n" not in str(info.value)
