"""Activation normalisation (data.normalize_activations): the SAE trains on s * x with s = sqrt(d) / mean ||x||
(a transcoder on (s_x x, s_y y), a factor per site), the factors are estimated once over the first batches, saved,
restored on resume, and folded into `load_sae`'s weights so that the loaded model takes and returns raw
activations."""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sae_dist import load_sae
from sae_dist.config import ConfigError
from sae_dist.data import build_activation_source
from sae_dist.data.source import ActivationSource
from sae_dist.interop.saebench import as_saebench
from sae_dist.models import build_sae
from sae_dist.parallel.context import ParallelContext
from sae_dist.run_dir import CHECKPOINTS_DIR, LATEST_FILE, checkpoint_name, latest_checkpoint, read_metrics
from sae_dist.train import trainer as trainer_module
from sae_dist.train.init import init_biases_from_batch
from sae_dist.train.input_scale import ESTIMATE_BATCHES, estimate_input_scales, scale_rows
from sae_dist.train.trainer import Trainer
from sae_dist.validation import validate

RAW_SCALE = 40.0
"""Synthetic activations times this: mean norms far above sqrt(d) = 8."""
TARGET_RAW_SCALE = 0.25
"""A transcoder's synthetic targets times this: mean norms far below sqrt(d_out), on the other side of 1 from x."""
D_IN, D_OUT = 64, 24

KINDS = {"switch": ("switch", 4), "topk": ("topk", 1), "batchtopk": ("batchtopk", 4), "relu": ("relu", 1)}


class LoudSource(ActivationSource):
    """A source whose rows are RAW_SCALE times another's; for a transcoder's rows [x | y] (`d_in` given), x times
    RAW_SCALE and y times TARGET_RAW_SCALE."""

    def __init__(self, inner: ActivationSource, d_in: int | None = None):
        self.inner, self.d_model, self.d_in = inner, inner.d_model, d_in

    def next_batch(self, batch_size: int) -> torch.Tensor:
        rows_TC = self.inner.next_batch(batch_size)
        if self.d_in is None:
            return rows_TC * RAW_SCALE
        return torch.cat((rows_TC[:, : self.d_in] * RAW_SCALE, rows_TC[:, self.d_in :] * TARGET_RAW_SCALE), dim=1)

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
    meta = json.loads((checkpoint / "config.json").read_text())
    assert meta["input_scale"] == s and "target_scale" not in meta and trainer.state.target_scale is None
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

    monkeypatch.setattr(trainer_module, "estimate_input_scales", refuse)
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


# --- transcoders: a factor per site --------------------------------------------------------------------------------
def transcoder_cfg(make_run, kind: str, skip: bool, steps: int = 20):
    """A normalised run of a `kind` transcoder from the 64-d synthetic x to a 24-d y."""
    run = normalised_run(make_run, kind, KINDS[kind][1], steps)
    run.sae.d_out, run.sae.skip = D_OUT, skip
    validate(run)
    return run


def transcoder_trainer(run) -> Trainer:
    return Trainer(run, LoudSource(build_activation_source(run), D_IN))


def perturbed_transcoder(run, rows_TC: torch.Tensor):
    """`run`'s transcoder, in eval mode, initialised on the rows [x | y] `rows_TC` (biases at their geometric
    medians), every other parameter of the fold made nonzero: W_skip, encoder biases, BatchTopK thresholds."""
    model = build_sae(run.sae, D_IN, seed=3)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        init_biases_from_batch(model, rows_TC)
        if model.w_skip is not None:
            model.w_skip.copy_(torch.randn(model.w_skip.shape, generator=generator) * 0.1)
        b_enc = model.experts.b_enc if hasattr(model, "experts") else model.b_enc
        if b_enc is not None:
            b_enc.copy_(torch.randn(b_enc.shape, generator=generator) * 0.1)
        if run.sae.kind == "batchtopk":
            model.experts.threshold_N.copy_(torch.rand(model.experts.threshold_N.shape, generator=generator) * 0.3 + 0.1)
    return model.eval()


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("kind", list(KINDS))
def test_the_transcoder_fold_gives_raw_units(make_run, kind, skip):
    """Trained on (s_x x, s_y y), folded: on raw x the latents are the trained ones / s_y, the same latents active,
    and y_hat = y_hat' / s_y; the decoder rows are untouched."""
    run = transcoder_cfg(make_run, kind, skip)
    source = LoudSource(build_activation_source(run), D_IN)
    s_x, s_y = estimate_input_scales(source, 256, ParallelContext(), torch.device("cpu"), D_IN)
    assert s_x < 0.5 and s_y > 2  # the two sites far apart, on either side of 1
    rows_TC = source.next_batch(128)
    x_TD = rows_TC[:, :D_IN]
    trained = perturbed_transcoder(run, scale_rows(rows_TC, D_IN, s_x, s_y))
    folded = copy.deepcopy(trained)
    folded.fold_input_scale_(s_x, s_y)

    with torch.no_grad():
        expected_TO = trained(x_TD * s_x).x_hat_TD / s_y
        torch.testing.assert_close(folded(x_TD).x_hat_TD, expected_TO, atol=1e-5, rtol=1e-5)
        ours, theirs = folded.encode(x_TD), trained.encode(x_TD * s_x)
        active = ours.values_TK > 0
        assert torch.equal(active, theirs.values_TK > 0) and torch.equal(ours.indices_TK, theirs.indices_TK)
        assert active.any() and (kind not in ("relu", "batchtopk") or not active.all())  # thresholds decide too
        torch.testing.assert_close(ours.values_TK, theirs.values_TK / s_y, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(folded.decode(ours, x_TD), expected_TO, atol=1e-5, rtol=1e-5)
    for before, after in zip(trained.decoder_weights(), folded.decoder_weights(), strict=True):
        assert torch.equal(before, after)


@pytest.mark.parametrize("kind", list(KINDS))
def test_an_sae_fold_is_the_fold_with_equal_scales(make_run, kind):
    """An SAE's one scale: fold(s) = fold(s, s) bit for bit, the encoder and decoder weights kept to the bit and
    b_pre = b_pre' / s exactly; two different scales are refused."""
    run = normalised_run(make_run, kind, KINDS[kind][1])
    model = build_sae(run.sae, D_IN, seed=3)
    with torch.no_grad():
        model.b_pre.copy_(torch.randn(D_IN, generator=torch.Generator().manual_seed(5)))
    one, two = copy.deepcopy(model), copy.deepcopy(model)
    one.fold_input_scale_(0.037)
    two.fold_input_scale_(0.037, 0.037)
    for (name, before), after, again in zip(model.state_dict().items(), one.state_dict().values(),
                                            two.state_dict().values(), strict=True):
        assert torch.equal(after, again), name
        if "enc" in name and "b_enc" not in name or "dec" in name:
            assert torch.equal(after, before), name
    assert torch.equal(one.b_pre, model.b_pre / 0.037)
    with pytest.raises(ValueError, match=r"^target_scale=2.0: an SAE's target is its input, of scale 0.037; "):
        copy.deepcopy(model).fold_input_scale_(0.037, 2.0)


def test_a_transcoders_batches_are_scaled_per_site(make_run):
    """The trainer's batches are [s_x x | s_y y]; targets that are all zero leave s_y undefined: a one-line error."""
    run = transcoder_cfg(make_run, "topk", False)
    trainer = transcoder_trainer(run)
    trainer.state.input_scale, trainer.state.target_scale = 0.5, 4.0
    rows_TC = LoudSource(build_activation_source(run), D_IN).next_batch(run.trainer.batch_size)
    assert torch.equal(trainer.next_batch(), torch.cat((rows_TC[:, :D_IN] * 0.5, rows_TC[:, D_IN:] * 4.0), dim=1))

    class SilentTargets(LoudSource):
        def next_batch(self, batch_size: int) -> torch.Tensor:
            return torch.cat((super().next_batch(batch_size)[:, :D_IN], torch.zeros(batch_size, D_OUT)), dim=1)

    with pytest.raises(ValueError, match=r"^data.normalize_activations: the 8 batches of every rank hold no finite, "
                                         r"nonzero input and target to estimate the scale from$"):
        estimate_input_scales(SilentTargets(build_activation_source(run), D_IN), 16, ParallelContext(),
                              torch.device("cpu"), D_IN)


@pytest.mark.parametrize(("kind", "skip"), [("switch", True), ("topk", False), ("batchtopk", True), ("relu", False)])
def test_a_normalised_transcoder_trains_and_loads_in_raw_units(make_run, tmp_path, kind, skip):
    """Both factors estimated from the stream's first batches (checked against the same rows), saved, and folded by
    `load_sae` and the SAELens export: on raw x they give the trained model's outputs / s_y."""
    saelens = pytest.importorskip("sae_lens")
    import sae_dist.interop.saelens_switch  # noqa: F401  (registers the Switch transcoders)
    from sae_dist.interop.saelens import export_saelens

    run = transcoder_cfg(make_run, kind, skip)
    trainer = transcoder_trainer(run)
    trainer.train()
    s_x, s_y = trainer.state.input_scale, trainer.state.target_scale

    fresh = LoudSource(build_activation_source(run), D_IN)
    rows_TC = torch.cat([fresh.next_batch(run.trainer.batch_size) for _ in range(ESTIMATE_BATCHES)]).double()
    assert s_x == pytest.approx(math.sqrt(D_IN) / rows_TC[:, :D_IN].norm(dim=1).mean().item(), rel=1e-9)
    assert s_y == pytest.approx(math.sqrt(D_OUT) / rows_TC[:, D_IN:].norm(dim=1).mean().item(), rel=1e-9)
    assert s_x < 0.5 and s_y > 2
    rows = read_metrics(run.trainer.out_dir)
    assert rows[-1]["loss"] < rows[0]["loss"]
    meta = json.loads((latest_checkpoint(run.trainer.out_dir) / "config.json").read_text())
    assert (meta["input_scale"], meta["target_scale"]) == (s_x, s_y)

    loaded = load_sae(run.trainer.out_dir)
    trained = trainer.model.eval()
    x_TD = fresh.next_batch(64)[:, :D_IN]
    with torch.no_grad():
        expected_TO = trained(x_TD * s_x).x_hat_TD / s_y
        torch.testing.assert_close(loaded(x_TD).x_hat_TD, expected_TO, atol=1e-5, rtol=1e-5)
        ours, theirs = loaded.encode(x_TD), trained.encode(x_TD * s_x)
        torch.testing.assert_close(ours.values_TK, theirs.values_TK / s_y, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.decode(ours, x_TD), expected_TO, atol=1e-5, rtol=1e-5)

    export_saelens(loaded, run, tmp_path / "export")
    lens = saelens.SAE.load_from_disk(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "cfg.json").read_text())["normalize_activations"] == "none"
    with torch.no_grad():
        torch.testing.assert_close(lens(x_TD), expected_TO, atol=1e-5, rtol=1e-5)


def test_a_normalised_transcoder_resumes_bit_for_bit(make_run, tmp_path, monkeypatch):
    """A run folder holding only the step-10 checkpoint of a 20-step run, continued to step 20, ends with the unbroken
    run's weights bit for bit, restoring both factors and never estimating them again."""
    run = transcoder_cfg(make_run, "switch", True)
    unbroken = transcoder_trainer(run)
    unbroken.train()
    s_x, s_y = unbroken.state.input_scale, unbroken.state.target_scale
    step_10 = Path(run.trainer.out_dir) / CHECKPOINTS_DIR / checkpoint_name(10)
    state = torch.load(step_10 / "trainer_state.pt", weights_only=False)
    assert (state["input_scale"], state["target_scale"]) == (s_x, s_y)

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(step_10, resumed_dir / CHECKPOINTS_DIR / checkpoint_name(10))
    (resumed_dir / CHECKPOINTS_DIR / LATEST_FILE).write_text(checkpoint_name(10))

    def refuse(*args, **kwargs):
        raise AssertionError("a continued run estimated the input scales again")

    monkeypatch.setattr(trainer_module, "estimate_input_scales", refuse)
    resumed = transcoder_trainer(replace(run, trainer=replace(run.trainer, out_dir=str(resumed_dir))))
    resumed.train()
    assert resumed.state.step == 20 and (resumed.state.input_scale, resumed.state.target_scale) == (s_x, s_y)
    for (name, ours), theirs in zip(resumed.model.state_dict().items(), unbroken.model.state_dict().values(),
                                    strict=True):
        assert torch.equal(ours, theirs), name
