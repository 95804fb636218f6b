"""The trainer's step (fused clipped Adam, weight gradients written in place, decoder projection and renormalisation
in row chunks, AuxK over lagged candidate lists) equals the straightforward step on the dense-then-mask oracle, for
every formulation; a non-finite step changes nothing."""

import copy

import pytest
import torch

from sae_dist.data import build_activation_source
from sae_dist.train.latents import DeadLatentTracker
from sae_dist.train.init import init_biases_from_batch
from sae_dist.train.step import build_step
from sae_dist.train.trainer import Trainer
from tests.conftest import small_run
from tests.reference import reference_train_step

BATCH = 64


def step_run(tmp_path, kind: str, formulation=("auto", "auto")):
    """64-d synthetic activations, 256 latents (4 experts for Switch), k = 8; latents die after 2 steps and AuxK
    is on for both kinds, so the lagged candidate lists take part from the third step. Gradient norms are 0.3-0.9
    here, so a clip at 0.7 acts on some steps and not on others."""
    run = small_run(tmp_path, kind=kind, batch_size=BATCH, steps=1000, lr=1e-3, grad_clip=0.7)
    run.sae.encoder_backward_kernel, run.sae.decoder_kernel = formulation
    run.sae.dead_tokens, run.sae.auxk_alpha = 2 * BATCH, 0.5
    return run


def assert_same_weights(model, reference, tol: dict) -> None:
    """The trainer renormalises decoder rows after its update, the reference before its next forward."""
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        expected = ref_params[name].detach().to(param.device)
        if name == "experts.w_dec":
            expected = expected / expected.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(param.detach(), expected, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("formulation", [("sparse", "gather"), ("gemm", "gemm"), ("sparse", "gemm")])
@pytest.mark.parametrize("kind", ["switch", "topk"])
def test_trainer_steps_equal_reference_steps(tmp_path, kind, formulation):
    run = step_run(tmp_path, kind, formulation)
    trainer = Trainer(run, build_activation_source(run))
    source = build_activation_source(run)
    batches = [source.next_batch(BATCH) for _ in range(6)]
    init_biases_from_batch(trainer.model, batches[0])
    reference = copy.deepcopy(trainer.model)
    cfg = run.trainer
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                     foreach=False)
    ref_dead = DeadLatentTracker(trainer.model.num_local_latents, run.sae.dead_tokens)
    auxk_steps = 0
    for step, x_TD in enumerate(batches):
        result = trainer.train_step(x_TD)
        auxk = step * BATCH >= run.sae.dead_tokens  # no latent can be dead before: AuxK does not run
        dead_mask_L = ref_dead.dead_mask() if auxk else None
        ref_loss, f_TL = reference_train_step(reference, ref_optimizer, x_TD, cfg.grad_clip, dead_mask_L)
        ref_dead.update((f_TL > 0).any(0), BATCH)
        auxk_steps += bool(auxk and dead_mask_L.any())
        assert bool(result.finite) and ("auxk" in result.terms) == auxk
        torch.testing.assert_close(result.loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert torch.equal(trainer.dead.tokens_since_fired_L, ref_dead.tokens_since_fired_L)
        assert_same_weights(trainer.model, reference, {"rtol": 1e-4, "atol": 1e-6})
    assert auxk_steps >= 2, "expected dead latents in several steps"


def test_non_finite_batch_applies_no_update(tmp_path):
    """A NaN batch: 'finite' is False and weights, Adam moments and steps, dead counters stay bit for bit; the
    next step continues exactly as a run that never saw the bad batch."""
    run = step_run(tmp_path, "topk")
    source = build_activation_source(run)
    batches = [source.next_batch(BATCH) for _ in range(4)]
    trainers = [Trainer(run, build_activation_source(run)) for _ in range(2)]
    for trainer in trainers:
        init_biases_from_batch(trainer.model, batches[0])
        for x_TD in batches[:3]:
            assert bool(trainer.train_step(x_TD).finite)
    skipping = trainers[0]
    before = copy.deepcopy((skipping.model.state_dict(), skipping.optimizer.state_dict()["state"]))
    counters = skipping.dead.tokens_since_fired_L.clone()
    bad_TD = batches[3].clone()
    bad_TD[5, 7] = float("nan")
    result = skipping.train_step(bad_TD)
    assert not bool(result.finite) and result.finite.dim() == 0
    after = (skipping.model.state_dict(), skipping.optimizer.state_dict()["state"])
    for name, tensor in before[0].items():
        torch.testing.assert_close(after[0][name], tensor, rtol=0, atol=0, msg=name)
    for index, state in before[1].items():
        for key, tensor in state.items():
            torch.testing.assert_close(after[1][index][key], tensor, rtol=0, atol=0, msg=f"{index}.{key}")
    assert torch.equal(skipping.dead.tokens_since_fired_L, counters)
    for trainer in trainers:
        assert bool(trainer.train_step(batches[3]).finite)
    for (name, a), b in zip(trainers[0].model.state_dict().items(), trainers[1].model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("formulation", [("sparse", "gather"), ("gemm", "gemm")])
def test_bf16_autocast_step_runs_with_a_float32_router(tmp_path, formulation):
    run = step_run(tmp_path, "switch", formulation)
    run.trainer.dtype = "bfloat16"
    trainer = Trainer(run, build_activation_source(run))
    x_TD = build_activation_source(run).next_batch(BATCH)
    init_biases_from_batch(trainer.model, x_TD)
    plain = trainer.model.router(x_TD)
    result = trainer.train_step(x_TD)
    assert bool(result.finite) and result.out.routing.probs_TN.dtype == torch.float32
    assert torch.equal(result.out.routing.expert_T, plain.expert_T)


def test_bf16_optimizer_state_resumes_bit_for_bit(tmp_path):
    """trainer.optimizer_state=bfloat16: the moments stay bfloat16 through a checkpoint, and a run resumed at step
    2 ends where an unbroken one does."""

    def run_for(out_dir, steps, resume=False):
        run = small_run(tmp_path, steps=steps, checkpoint_every=2, log_every=2, out_dir=str(tmp_path / out_dir),
                        resume=resume, lr_decay_frac=0.0)
        run.trainer.optimizer_state = "bfloat16"
        trainer = Trainer(run, build_activation_source(run))
        trainer.train()
        return trainer

    unbroken = run_for("unbroken", 4)
    run_for("resumed", 2)
    resumed = run_for("resumed", 4, resume=True)
    for name, tensor in unbroken.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    for state in resumed.optimizer.state.values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16


def test_step_built_alone_equals_the_trainers_step_and_writes_nothing(tmp_path, monkeypatch):
    """`build_step` (what benchmarks time) gives the trainer's model and steps bit for bit, reading and writing no
    file: the run folder it is given is never made."""
    run = step_run(tmp_path / "never made", "switch")
    trainer = Trainer(run, build_activation_source(run))
    monkeypatch.chdir(tmp_path)
    step = build_step(run, trainer.d_model)
    for (name, a), b in zip(trainer.model.state_dict().items(), step.model.state_dict().values()):
        assert torch.equal(a, b), name
    source = build_activation_source(run)
    batches = [source.next_batch(BATCH) for _ in range(4)]
    for model in (trainer.model, step.model):
        init_biases_from_batch(model, batches[0])
    for i, x_TD in enumerate(batches):
        ours, theirs = step(x_TD, i, i * BATCH), trainer.train_step(x_TD)
        trainer.step, trainer.tokens = i + 1, (i + 1) * BATCH
        assert torch.equal(ours.loss, theirs.loss) and ours.lr == theirs.lr and bool(ours.finite)
    for (name, a), b in zip(trainer.model.state_dict().items(), step.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert list(tmp_path.iterdir()) == []
