"""Dead-latent resampling (sae.resample_every) equals its straightforward definition on one device, and is checked at
start-up. Expert parallelism: tests/parallel (training_resample_*); resume across a resample: test_trainer."""

from __future__ import annotations

import copy

import pytest
import torch

from sae_dist.config import ConfigError
from sae_dist.data import build_activation_source
from sae_dist.train.latents import resample_due
from sae_dist.train.resample import resample_generator
from sae_dist.train.trainer import Trainer
from sae_dist.validation import validate
from tests.conftest import small_run

BATCH = 64


def reference_resample(trainer: Trainer, rows_TC: torch.Tensor, out, step: int) -> int:
    """Resample `trainer`'s dead latents latent by latent, straight from the definition; return how many. A
    transcoder's rows are [x | y]: the error and the decoder row come from y, the encoder row from x."""
    model, run = trainer.model, trainer.run
    bank, width = model.experts, model.latents_per_expert
    d_in = model.d_model
    x_TD, y_TD = (rows_TC[:, :d_in], rows_TC[:, d_in:]) if run.sae.d_out else (rows_TC, rows_TC)
    expert_T = out.routing.expert_TE[:, 0] if out.routing is not None else torch.zeros(len(x_TD), dtype=torch.long)
    error_T = (y_TD - out.x_hat_TD.detach()).pow(2).sum(1)
    dead_NM = trainer.dead.tokens_since_fired_L.view(-1, width) >= run.sae.dead_tokens
    count = 0
    with torch.no_grad():
        norms_NM = bank.w_enc.norm(dim=-1)
        for expert in range(bank.num_local):
            columns = [j for j in range(width) if dead_NM[expert, j]]
            tokens = [t for t in range(len(x_TD)) if expert_T[t] == expert]
            if not columns or not tokens:
                continue
            live = [norms_NM[expert, j] for j in range(width) if not dead_NM[expert, j]]
            scale = 0.2 * (sum(live) / len(live) if live else norms_NM[expert].mean())
            weights = torch.stack([error_T[t] for t in tokens]).double()
            picks = torch.multinomial(weights, len(columns), replacement=True,
                                      generator=resample_generator(run.trainer.seed, step, expert))
            for column, pick in zip(columns, picks.tolist()):
                v_D = x_TD[tokens[pick]] - (model.b_in if run.sae.d_out else model.b_pre)
                u_D = y_TD[tokens[pick]] - (model.b_out if run.sae.d_out else model.b_pre)
                bank.w_dec[expert, column] = u_D / u_D.norm()
                bank.w_enc[expert, column] = v_D / v_D.norm() * scale
                if bank.b_enc is not None:
                    bank.b_enc[expert, column] = 0.0
                for param in (bank.w_enc, bank.w_dec, bank.b_enc):
                    if param is not None:
                        trainer.optimizer.state[param]["exp_avg"][expert, column] = 0
                        trainer.optimizer.state[param]["exp_avg_sq"][expert, column] = 0
                trainer.dead.tokens_since_fired_L.view(-1, width)[expert, column] = 0
                count += 1
    return count


def resample_run(tmp_path, kind: str, **options):
    run = small_run(tmp_path, kind=kind, batch_size=BATCH, steps=20)
    run.sae.dead_tokens, run.sae.resample_every = 2 * BATCH, 4
    for key, value in options.items():
        section, name = key.split(".")
        setattr(getattr(run, section), name, value)
    validate(run)
    return run


@pytest.mark.parametrize(
    ("kind", "options"),
    [("switch", {}), ("topk", {}), ("switch", {"trainer.optimizer_state": "bfloat16"}),
     ("switch", {"sae.experts_per_token": 2, "sae.dead_tokens": BATCH}), ("switch", {"sae.d_out": 10}),
     ("topk", {"sae.d_out": 80, "sae.skip": True})],
)
def test_resampling_equals_the_reference(tmp_path, kind, options):
    """Two trainers step alike; at the resample step one resamples itself, the other (resampling off) gets the
    reference resampling: weights, Adam moments (float32 and bfloat16) and dead counters then agree, and the count
    is logged. Under top-2 routing tokens count for their first-choice expert. Transcoders: docs/math.md section 9."""
    trainer = Trainer(resample_run(tmp_path / "a", kind, **options),
                      build_activation_source(resample_run(tmp_path, kind, **options)))
    plain_run = resample_run(tmp_path / "b", kind, **options)
    plain_run.sae.resample_every = None
    plain = Trainer(plain_run, build_activation_source(plain_run))
    source = build_activation_source(plain_run)
    total = 0
    for step in range(1, 9):
        x_TD = source.next_batch(BATCH)
        for t in (trainer, plain):
            if step == 1:
                t._init_biases(x_TD)
        result = trainer.train_step(x_TD)
        plain_result = plain.train_step(x_TD)
        if step % 4 == 0:
            dead_before = int(plain.dead.dead_mask().sum())
            count = reference_resample(plain, x_TD, plain_result.out, step)
            assert 0 < count <= dead_before
            total += count
        for t in (trainer, plain):
            t.step, t.tokens = step, step * BATCH
        params = dict(plain.model.named_parameters())
        for name, param in trainer.model.named_parameters():
            torch.testing.assert_close(param, params[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
            for key, value in trainer.optimizer.state[param].items():
                expected = plain.optimizer.state[params[name]][key]
                torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {key}: {m}")
        assert torch.equal(trainer.dead.tokens_since_fired_L, plain.dead.tokens_since_fired_L)
        assert trainer.resampled == total
    assert total > 0
    assert trainer.step_metrics(x_TD, result)["resampled"] == total
    assert "resampled" not in plain.step_metrics(x_TD, plain_result)


def test_resampling_stops_when_the_lr_decay_begins(tmp_path):
    run = small_run(tmp_path, steps=30, lr_decay_frac=0.2)  # full lr for steps 1-24
    run.sae.resample_every = 6
    assert [s for s in range(1, 31) if resample_due(run, s)] == [6, 12, 18, 24]
    run.sae.resample_every = None
    assert not any(resample_due(run, s) for s in range(1, 31))


def test_resampling_is_checked_at_start_up(tmp_path):
    run = small_run(tmp_path)
    for value in (0, -3):
        bad = copy.deepcopy(run)
        bad.sae.resample_every = value
        with pytest.raises(ConfigError, match=f"^sae.resample_every={value} must be positive or null"):
            validate(bad)
    for kind in ("relu", "batchtopk"):
        bad = small_run(tmp_path, kind=kind)
        bad.sae.resample_every = 100
        with pytest.raises(ConfigError, match=f"^sae.resample_every=100: sae.kind='{kind}' has no dead-latent"):
            validate(bad)
    bad = copy.deepcopy(run)
    bad.sae.resample_every, bad.trainer.engine = 100, "deepspeed"
    with pytest.raises(ConfigError, match="^sae.resample_every=100 needs trainer.engine=torch"):
        validate(bad)
    with pytest.raises(ConfigError, match="^sae.auxk_scale='var' is unknown; allowed: x_variance, gao$"):
        bad = copy.deepcopy(run)
        bad.sae.auxk_scale = "var"
        validate(bad)
