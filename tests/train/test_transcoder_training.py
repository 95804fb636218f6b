"""Training transcoders (docs/math.md section 9): the trainer's steps equal the straightforward steps on the dense oracle for
every architecture, with and without the skip; `launch/train.py` trains one end to end, writes checkpoints, resumes
bit for bit, and `load_sae` reads it back."""

from __future__ import annotations

import copy
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from safetensors.torch import load_file

from sae_dist import load_sae
from sae_dist.data import build_activation_source
from sae_dist.run_dir import CHECKPOINTS_DIR, LATEST_FILE, MODEL_FILE, checkpoint_name, latest_checkpoint
from sae_dist.train.init import init_biases_from_batch
from sae_dist.train.latents import DeadLatentTracker
from sae_dist.train.trainer import Trainer
from tests.conftest import small_run
from tests.reference import decoder_parameter, reference_train_step

BATCH, D_OUT = 64, 24
ROOT = Path(__file__).resolve().parents[2]


def transcoder_run(tmp_path, kind: str, skip: bool, formulation=("auto", "auto")):
    """64-d synthetic inputs to 24-d targets; latents die after 2 steps and AuxK is on where the kind has it."""
    run = small_run(tmp_path, kind=kind, batch_size=BATCH, steps=1000, lr=1e-3, grad_clip=0.7)
    run.sae.d_out, run.sae.skip = D_OUT, skip
    run.sae.encoder_backward_kernel, run.sae.decoder_kernel = formulation
    run.sae.num_experts = 4 if kind in ("switch", "batchtopk") else 1
    run.sae.dead_tokens = 2 * BATCH
    run.sae.auxk_alpha = 0.5 if kind in ("switch", "topk") else None
    run.sae.l1_coefficient = 0.01
    return run


@pytest.mark.parametrize(("kind", "skip", "formulation"), [
    ("switch", False, ("sparse", "gather")), ("switch", True, ("gemm", "gemm")), ("topk", True, ("sparse", "gather")),
    ("topk", False, ("gemm", "gemm")), ("batchtopk", True, ("auto", "auto")), ("relu", True, ("auto", "auto")),
    ("relu", False, ("auto", "auto")),
])
def test_trainer_steps_equal_reference_steps(tmp_path, kind, skip, formulation):
    """Six steps: fused clipped Adam, in-place weight gradients, AuxK over lagged candidates (Switch, TopK) against
    the oracle's plain Adam on the dense formulation with the same target y."""
    run = transcoder_run(tmp_path, kind, skip, formulation)
    trainer = Trainer(run, build_activation_source(run))
    assert trainer.d_model == 64 and trainer.model.d_out == D_OUT
    source = build_activation_source(run)
    batches = [source.next_batch(BATCH) for _ in range(6)]
    assert batches[0].shape == (BATCH, 64 + D_OUT)
    init_biases_from_batch(trainer.model, batches[0])
    reference = copy.deepcopy(trainer.model)
    cfg = run.trainer
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                     foreach=False)
    ref_dead = DeadLatentTracker(trainer.model.num_local_latents, run.sae.dead_tokens)
    for step, rows_TC in enumerate(batches):
        trainer.step = step  # the L1 warm-up of the ReLU kind follows it
        result = trainer.train_step(rows_TC)
        auxk = trainer.model.k_aux > 0 and step * BATCH >= run.sae.dead_tokens
        dead_mask_L = ref_dead.dead_mask() if auxk else None
        ref_loss, f_TL = reference_train_step(reference, ref_optimizer, rows_TC[:, :64], cfg.grad_clip, dead_mask_L,
                                              step / cfg.steps, y_TD=rows_TC[:, 64:])
        ref_dead.update((f_TL > 0).any(0), BATCH)
        assert bool(result.finite) and ("auxk" in result.terms) == auxk
        torch.testing.assert_close(result.loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert torch.equal(trainer.dead.tokens_since_fired_L, ref_dead.tokens_since_fired_L)
        ref_params = dict(reference.named_parameters())
        decoder = decoder_parameter(trainer.model)
        for name, param in trainer.model.named_parameters():
            expected = ref_params[name].detach()
            if param is decoder:  # the trainer renormalises after its update, the reference before its next forward
                expected = expected / expected.norm(dim=-1, keepdim=True)
            torch.testing.assert_close(param.detach(), expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    if skip:
        assert trainer.model.w_skip.abs().sum() > 0
    row = trainer.step_metrics(batches[-1], result)
    y_TO = batches[-1][:, 64:]
    mse = (y_TO - result.out.x_hat_TD).pow(2).sum(1).mean()
    assert row["mse"] == pytest.approx(float(mse), rel=1e-5)


def launch_train(monkeypatch, *args: str) -> None:
    """launch/train.py in this process, as from the shell; fails the test on a non-zero exit."""
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    try:
        runpy.run_path(str(ROOT / "launch" / "train.py"), run_name="__main__")
    except SystemExit as exc:
        assert not exc.code, exc.code
    finally:
        GlobalHydra.instance().clear()


TRANSCODER = ["data=synthetic", "data.d_model=32", "data.synthetic_features=64", "sae.d_out=16", "sae.skip=true",
              "sae.num_latents=128", "sae.num_experts=4", "sae.k=4", "trainer.batch_size=128", "trainer.steps=6",
              "trainer.checkpoint_every=3", "trainer.log_every=3", "trainer.progress=false",
              "trainer.tensorboard=false"]


def test_launch_trains_resumes_exactly_and_loads(tmp_path, monkeypatch):
    unbroken = tmp_path / "unbroken"
    launch_train(monkeypatch, *TRANSCODER, f"trainer.out_dir={unbroken}")
    final = latest_checkpoint(unbroken)
    assert final.name == checkpoint_name(6)
    # A run folder holding only the step-3 checkpoint, resumed to step 6: the same bytes as the unbroken run.
    resumed = tmp_path / "resumed"
    (resumed / CHECKPOINTS_DIR).mkdir(parents=True)
    shutil.copytree(unbroken / CHECKPOINTS_DIR / checkpoint_name(3), resumed / CHECKPOINTS_DIR / checkpoint_name(3))
    (resumed / CHECKPOINTS_DIR / LATEST_FILE).write_text(checkpoint_name(3))
    launch_train(monkeypatch, *TRANSCODER, f"trainer.out_dir={resumed}", "trainer.resume=true")
    weights = load_file(str(final / MODEL_FILE))
    resumed_weights = load_file(str(latest_checkpoint(resumed) / MODEL_FILE))
    assert sorted(weights) == ["b_in", "b_out", "experts.w_dec", "experts.w_enc", "router.b_router", "router.weight",
                               "w_skip"]
    for name, tensor in weights.items():
        assert torch.equal(resumed_weights[name], tensor), name
    sae = load_sae(unbroken)
    assert sae.transcoder and (sae.d_in, sae.d_out) == (32, 16) and sae.w_skip.abs().sum() > 0
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    run = small_run(tmp_path, batch_size=128)
    run.data.d_model, run.data.synthetic_features, run.sae.d_out = 32, 64, 16
    rows_TC = build_activation_source(run).next_batch(64)
    x_TD, y_TO = sae.split_batch(rows_TC)
    y_hat_TO = sae.decode(sae.encode(x_TD), x_TD)
    torch.testing.assert_close(y_hat_TO, sae(x_TD).x_hat_TD, rtol=1e-5, atol=1e-5)
    base_error = (y_TO - y_TO.mean(0)).pow(2).sum(1).mean()
    assert (y_TO - y_hat_TO).pow(2).sum(1).mean() < base_error  # it learned something of the map in 6 steps
