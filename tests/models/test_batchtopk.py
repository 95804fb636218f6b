"""BatchTopK experts against a straightforward dense implementation: forward, loss terms, every gradient, the
threshold's update and the eval-mode rule; and through the trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sae_dist import load_sae
from sae_dist.config import ConfigError, SAEConfig
from sae_dist.data import build_activation_source
from sae_dist.models.batchtopk import THRESHOLD_DECAY
from sae_dist.models.losses import total_loss
from sae_dist.train.trainer import Trainer
from sae_dist.validation import validate
from tests.conftest import small_run
from tests.models.model_helpers import make_switch, routed_inputs
from tests.reference import naive_batchtopk_forward as naive


@pytest.fixture
def model_and_batch():
    """Expert 2 gets no token; expert 3 gets one."""
    sae = make_switch(4, 64, 3, 12, kind="batchtopk")
    return sae, routed_inputs(12, 4, [17, 22, 0, 1]).double()


def test_forward_loss_and_every_gradient_equal_the_dense_implementation(model_and_batch):
    sae, x_TD = model_and_batch
    out = sae(x_TD)
    ref_x_hat, ref_z_TM, expert_T, ref_terms = naive(sae, x_TD)
    torch.testing.assert_close(out.x_hat_TD, ref_x_hat)
    codes_TM = sae.dispatcher.combine(out.latent_values_RK, out.plan)
    torch.testing.assert_close(codes_TM, ref_z_TM)
    counts = torch.bincount(expert_T, minlength=4)
    assert ((ref_z_TM > 0).sum() == counts.sum() * 3) and not torch.equal((ref_z_TM > 0).sum(1), torch.full((40,), 3))
    terms = sae.loss_terms(x_TD, out)
    weights = sae.loss_weights(0.0)
    for name in ("rec", "lb"):
        torch.testing.assert_close(terms[name], ref_terms[name])
    grads = torch.autograd.grad(total_loss(terms, weights), list(sae.parameters()))
    ref_grads = torch.autograd.grad(total_loss(ref_terms, weights), list(sae.parameters()))
    for (name, _), grad, ref in zip(sae.named_parameters(), grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        assert ref.abs().sum() > 0, name


def test_threshold_is_an_ema_of_the_smallest_kept_activation_and_rules_eval(model_and_batch):
    sae, x_TD = model_and_batch
    applied = torch.tensor(True)
    _, z_TM, expert_T, _ = naive(sae, x_TD)
    reached = [e for e in range(4) if (expert_T == e).any()]
    assert reached == [0, 1, 3]
    batch_min = {e: z_TM[expert_T == e][z_TM[expert_T == e] > 0].min() for e in reached}
    sae.after_step(sae(x_TD), None, applied)
    for e in range(4):
        expected = batch_min[e] if e in reached else torch.tensor(0.0, dtype=torch.float64)
        torch.testing.assert_close(sae.experts.threshold_N[e].double(), expected.double(), rtol=1e-6, atol=0)
    before = sae.experts.threshold_N.clone()
    sae.after_step(sae(x_TD), None, torch.tensor(False))  # a skipped step changes nothing
    assert torch.equal(sae.experts.threshold_N, before)
    sae.after_step(sae(x_TD), None, applied)
    torch.testing.assert_close(sae.experts.threshold_N, before, rtol=1e-6, atol=0)  # same batch: same minima
    sae.experts.threshold_N[reached[0]] *= 1 / THRESHOLD_DECAY
    sae.eval()
    out = sae(x_TD)
    ref_x_hat, ref_z_TM, _, _ = naive(sae, x_TD)
    torch.testing.assert_close(out.x_hat_TD, ref_x_hat)
    torch.testing.assert_close(sae.dispatcher.combine(out.latent_values_RK, out.plan), ref_z_TM)


def test_trains_saves_and_reloads_with_its_threshold(tmp_path):
    run = small_run(tmp_path, steps=6, checkpoint_every=6, log_every=3)
    run.sae.kind = "batchtopk"
    validate(run)
    trainer = Trainer(run, build_activation_source(run))
    row = trainer.train()
    assert row["l0"] == pytest.approx(run.sae.k, rel=1e-6)  # k per token on average over the batch
    theta_N = trainer.model.experts.threshold_N
    assert (theta_N > 0).all()
    assert torch.equal(load_sae(run.trainer.out_dir).experts.threshold_N, theta_N)


def test_auxk_and_chunked_dispatch_are_refused():
    run = small_run(Path("unused"))
    run.sae = SAEConfig(kind="batchtopk", auxk_alpha=0.5)
    with pytest.raises(ConfigError, match="^sae.auxk_alpha=0.5: sae.kind='batchtopk' has no AuxK; use null or 0$"):
        validate(run)
    run.sae.auxk_alpha, run.parallel.a2a_chunks = None, 2
    with pytest.raises(ConfigError, match="^parallel.a2a_chunks=2: sae.kind='batchtopk' selects over each expert's"):
        validate(run)
