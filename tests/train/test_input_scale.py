"""Activation normalisation (data.normalize_activations): the SAE trains on s * x with s = sqrt(d) / mean ||x||, s is
estimated once over the first batches, saved, restored on resume, and folded into `load_sae`'s weights so that the
loaded SAE takes and returns raw activations."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from sae_dist import load_sae
from sae_dist.config import ConfigError
from sae_dist.data import build_activation_source
from sae_dist.data.source import ActivationSource
from sae_dist.interop.saebench import as_saebench
from sae_dist.run_dir import latest_checkpoint, read_metrics
from sae_dist.train import trainer as trainer_module
from sae_dist.train.input_scale import ESTIMATE_BATCHES
from sae_dist.train.trainer import Trainer
from sae_dist.validation import validate

RAW_SCALE = 40.0
"""Synthetic activations times this: mean norms far above sqrt(d) = 8."""

KINDS = {"switch": ("switch", 4), "topk": ("topk", 1), "batchtopk": ("batchtopk", 4), "relu": ("relu", 1)}


class LoudSource(ActivationSource):
    """A source whose rows are RAW_SCALE times another's."""

    def __init__(self, inner: ActivationSource):
        self.inner, self.d_model = inner, inner.d_model

    def next_batch(self, batch_size: int) -> torch.Tensor:
        return self.inner.next_batch(batch_size) * RAW_SCALE

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def normalised_run(make_run, kind="switch", experts=4, steps=20):
    run = make_run(kind=kind, steps=steps)
    run = replace(run, sae=replace(run.sae, num_experts=experts), data=replace(run.data, normalize_activations=
                                                                               "expected_average_only_in"))
    run.sae.l1_coefficient, run.sae.l1_warmup_frac = 0.05, 0.0
    validate(run)
    return run


def trainer_of(run) -> Trainer:
    return Trainer(run, LoudSource(build_activation_source(run)))


@pytest.mark.parametrize("name", list(KINDS))
def test_a_normalised_run_trains_and_loads_on_raw_activations(make_run, name):
    kind, experts = KINDS[name]
    run = normalised_run(make_run, kind, experts)
    trainer = trainer_of(run)
    trainer.train()

    fresh = LoudSource(build_activation_source(run))
    norms = torch.cat([fresh.next_batch(run.trainer.batch_size).norm(dim=1) for _ in range(ESTIMATE_BATCHES)])
    s = trainer.state.input_scale
    assert s == pytest.approx(math.sqrt(run.data.d_model) / norms.double().mean().item(), rel=1e-9)
    assert s < 0.5  # the raw norms are far from sqrt(d)
    rows = read_metrics(run.trainer.out_dir)
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["fvu"] < 0.9

    checkpoint = latest_checkpoint(run.trainer.out_dir)
    assert json.loads((checkpoint / "config.json").read_text())["input_scale"] == s
    loaded = load_sae(run.trainer.out_dir)
    trained = trainer.model.eval()
    x_TD = fresh.next_batch(64)
    expected_TD = trained(x_TD * s).x_hat_TD / s
    torch.testing.assert_close(loaded(x_TD).x_hat_TD, expected_TD, atol=1e-5, rtol=1e-5)
    ours, theirs = loaded.encode(x_TD), trained.encode(x_TD * s)
    torch.testing.assert_close(ours.indices_TK, theirs.indices_TK)
    torch.testing.assert_close(ours.values_TK, theirs.values_TK / s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded.decode(ours), expected_TD, atol=1e-5, rtol=1e-5)
    for w_dec in loaded.decoder_weights():  # the fold keeps the decoder rows unit norm
        torch.testing.assert_close(w_dec.norm(dim=-1), torch.ones(w_dec.shape[:-1]), atol=1e-5, rtol=0)
    flat = as_saebench(loaded)
    torch.testing.assert_close(flat.decode(flat.encode(x_TD)), expected_TD, atol=1e-5, rtol=1e-5)


def test_resume_keeps_the_saved_scale_and_never_estimates_again(make_run, monkeypatch):
    run = normalised_run(make_run, steps=10)
    first = trainer_of(run)
    first.train()
    s = first.state.input_scale
    state = torch.load(latest_checkpoint(run.trainer.out_dir) / "trainer_state.pt", weights_only=False)
    assert state["input_scale"] == s

    def refuse(*args, **kwargs):
        raise AssertionError("a continued run estimated the input scale again")

    monkeypatch.setattr(trainer_module, "estimate_input_scale", refuse)
    longer = replace(run, trainer=replace(run.trainer, steps=20))
    second = trainer_of(longer)
    second.train()
    assert second.state.step == 20 and second.state.input_scale == s
    assert json.loads((latest_checkpoint(run.trainer.out_dir) / "config.json").read_text())["input_scale"] == s


def test_off_by_default_nothing_is_recorded(make_run):
    run = make_run(steps=10)
    assert run.data.normalize_activations == "none"
    trainer = Trainer(run, build_activation_source(run))
    trainer.train()
    checkpoint = latest_checkpoint(run.trainer.out_dir)
    assert trainer.state.input_scale is None
    assert "input_scale" not in json.loads((checkpoint / "config.json").read_text())
    assert "input_scale" not in torch.load(checkpoint / "trainer_state.pt", weights_only=False)


def test_bad_values_are_one_line(make_run):
    run = make_run()
    run.data.normalize_activations = "layer_norm"
    with pytest.raises(ConfigError, match=r"^data.normalize_activations='layer_norm' is unknown; allowed: none, "
                                          r"expected_average_only_in$"):
        validate(run)


def test_the_saelens_export_of_a_normalised_run_takes_raw_activations(make_run, tmp_path):
    saelens = pytest.importorskip("sae_lens")
    import sae_dist.interop.saelens_switch  # noqa: F401  (registers 'sae_dist_switch')
    from sae_dist.interop.saelens import export_saelens

    run = normalised_run(make_run, steps=10)
    trainer = trainer_of(run)
    trainer.train()
    export_saelens(load_sae(run.trainer.out_dir), run, tmp_path / "export")
    lens = saelens.SAE.load_from_disk(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "cfg.json").read_text())["normalize_activations"] == "none"
    s, x_TD = trainer.state.input_scale, LoudSource(build_activation_source(run)).next_batch(64)
    expected_TD = trainer.model.eval()(x_TD * s).x_hat_TD / s
    torch.testing.assert_close(lens.decode(lens.encode(x_TD)), expected_TD, atol=1e-5, rtol=1e-5)
