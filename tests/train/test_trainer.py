"""The training loop end to end on synthetic activations: learning, outputs, checkpoints and exact resume."""

import json

import pytest
import torch

from sae_dist import load_sae
from sae_dist.data import build_activation_source
from sae_dist.data.synthetic import SyntheticSource, feature_recovery
from sae_dist.run_dir import latest_checkpoint, read_metrics
from sae_dist.train.run import RunDirectoryError, train_from_config
from sae_dist.train.trainer import Trainer


def train(run):
    trainer = Trainer(run, build_activation_source(run))
    trainer.train()
    return trainer


@pytest.mark.parametrize("kind", ["switch", "topk", "relu"])
def test_loss_falls_and_outputs_are_written(make_run, kind):
    run = make_run(kind=kind, steps=40, tensorboard=True)
    run.sae.l1_coefficient, run.sae.l1_warmup_frac = 0.05, 0.0  # a fixed objective, so the loss must fall
    trainer = train(run)
    rows = read_metrics(run.trainer.out_dir)
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["mse"] < 0.8 * rows[0]["mse"]
    expected = {"step", "tokens", "loss", "mse", "fvu", "l0", "dead", "lr", "tokens_per_s", "grad_norm"}
    assert expected <= rows[-1].keys()
    if kind == "switch":
        assert {"lb", "expert_load"} <= rows[-1].keys()
        assert sum(rows[-1]["expert_load"]) == pytest.approx(1.0)
        assert rows[-1]["l0"] <= run.sae.k
    assert any((trainer.run_dir / "tensorboard").iterdir())
    # decoder rows stay unit norm after the last step's projection + Adam (within drift of one step)
    for w_dec in trainer.model.decoder_weights():
        assert (w_dec.norm(dim=-1) - 1).abs().max() < 0.05


def test_checkpoint_reloads_through_public_api(make_run):
    run = make_run(steps=20)
    trainer = train(run)
    sae = load_sae(run.trainer.out_dir)
    for name, tensor in trainer.model.state_dict().items():
        torch.testing.assert_close(sae.state_dict()[name], tensor, rtol=0, atol=0)
    x = torch.randn(10, 64)
    latents = sae.encode(x)
    assert latents.values_TK.shape == (10, run.sae.k)
    assert int(latents.indices_TK.max()) < run.sae.num_latents
    torch.testing.assert_close(sae.decode(latents), sae(x).x_hat_TD, rtol=1e-5, atol=1e-5)
    config = json.loads((latest_checkpoint(run.trainer.out_dir) / "config.json").read_text())
    assert config["d_model"] == 64 and config["run"]["sae"]["num_experts"] == 4


class CrashingSource:
    """Wraps a source and raises after `crash_after` batches, like a killed job."""

    def __init__(self, source, crash_after):
        self.source, self.left = source, crash_after
        self.d_model = source.d_model

    def next_batch(self, n):
        if self.left == 0:
            raise KeyboardInterrupt("simulated crash")
        self.left -= 1
        return self.source.next_batch(n)

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


@pytest.mark.parametrize(("kind", "resample_every"), [("switch", None), ("topk", None), ("switch", 6)])
def test_resume_after_crash_equals_uninterrupted_run(tmp_path, make_run, kind, resample_every):
    """Also across dead-latent resamplings (at steps 12, 18, 24 after the resume from step 10)."""
    # small dead threshold so AuxK (topk) and the dead counters take part in the state that must be restored
    unbroken_run = make_run(kind=kind, steps=30, out_dir=str(tmp_path / "a"))
    broken_run = make_run(kind=kind, steps=30, out_dir=str(tmp_path / "b"))
    for run in (unbroken_run, broken_run):
        run.sae.dead_tokens, run.sae.resample_every = 256, resample_every
    unbroken = train(unbroken_run)
    assert unbroken.dead.num_dead() > 0 or unbroken.resampled > 0
    crashed = Trainer(broken_run, CrashingSource(build_activation_source(broken_run), crash_after=14))
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    assert latest_checkpoint(broken_run.trainer.out_dir).name == "step_00000010"
    broken_run.trainer.resume = True
    resumed = train(broken_run)
    assert resumed.step == 30
    for name, tensor in unbroken.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(resumed.dead.tokens_since_fired_L, unbroken.dead.tokens_since_fired_L)
    params = dict(unbroken.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        for key, value in resumed.optimizer.state[param].items():
            torch.testing.assert_close(value, unbroken.optimizer.state[params[name]][key], rtol=0, atol=0)
    rows_a = read_metrics(tmp_path / "a")
    rows_b = read_metrics(tmp_path / "b")
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]
    assert [r["mse"] for r in rows_b] == [r["mse"] for r in rows_a]
    assert [r.get("resampled") for r in rows_b] == [r.get("resampled") for r in rows_a]
    if resample_every:
        assert rows_b[-1]["resampled"] == resumed.resampled == unbroken.resampled
        assert any(row["resampled"] < unbroken.resampled for row in rows_b if row["step"] > 10)


def test_refuses_to_overwrite_an_existing_run(make_run):
    """trainer.resume=false never trains over a folder that holds checkpoints (auto, the default, continues it)."""
    run = make_run(steps=10)
    train(run)
    run.trainer.resume = "false"
    with pytest.raises(RunDirectoryError, match="trainer.out_dir=.* already holds checkpoints .*trainer.resume=auto"):
        train_from_config(run)


def test_switch_sae_recovers_synthetic_features(tmp_path):
    """A small Switch SAE finds most ground-truth directions of the synthetic source."""
    from tests.conftest import small_run

    run = small_run(tmp_path, steps=300, batch_size=512, log_every=100, checkpoint_every=300)
    run.sae.num_latents, run.sae.num_experts, run.sae.k = 512, 4, 4
    trainer = train(run)
    source = SyntheticSource.from_config(run.data, run.trainer.seed)
    w_dec = trainer.model.experts.w_dec.flatten(0, 1)
    recovery = feature_recovery(w_dec, source.true_features)
    best_cosine_F = (source.true_features @ torch.nn.functional.normalize(w_dec, dim=-1).T).max(dim=1).values
    found = float((best_cosine_F > 0.9).float().mean())
    print(f"feature recovery: mean max cosine {recovery:.3f}, fraction with cosine > 0.9: {found:.3f}")
    assert recovery > 0.95
    assert found > 0.9


def test_train_from_config_ends_with_the_summary_table(make_run, capsys):
    run = make_run(steps=10)
    result = train_from_config(run, eval_batches=2)
    table = capsys.readouterr().out
    for label in ("MSE", "FVU", "L0", "dead latents", "expert load", "tokens/s", "FLOPs", "checkpoint"):
        assert label in table
    assert result["eval"]["l0"] <= run.sae.k and result["eval"]["mse"] > 0
    assert (result["checkpoint"] / "model.safetensors").exists()
