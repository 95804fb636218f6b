"""launch/export.py --format saelens: each export loads in SAELens (`SAE.load_from_disk`) and its encodings and
reconstructions equal sae-dist's; bad input is one line, exit status 2, with nothing written."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("sae_lens")
from sae_lens import SAE  # noqa: E402

import sae_dist.interop.saelens_switch  # noqa: E402  (registers the Switch SAE and transcoders)
from sae_dist import load_sae  # noqa: E402
from sae_dist.data import build_activation_source  # noqa: E402
from sae_dist.train.trainer import Trainer  # noqa: E402
from sae_dist.validation import validate  # noqa: E402
from tests.conftest import small_run  # noqa: E402

RUNS = {"switch": ("switch", 4), "topk": ("topk", 1), "relu": ("relu", 1), "batchtopk": ("batchtopk", 1),
        "batchtopk4": ("batchtopk", 4), "switch_skip_transcoder": ("switch", 4), "topk_transcoder": ("topk", 1)}
"""Run name -> (sae.kind, N)."""
TRANSCODERS = {"switch_skip_transcoder": {"d_out": 48, "skip": True}, "topk_transcoder": {"d_out": 48, "skip": False}}
"""The transcoders among RUNS (x 64 wide, y 48): their sae options."""
SAELENS_CLASS = {"switch": "SwitchSAELens", "topk": "TopKSAE", "relu": "StandardSAE", "batchtopk": "JumpReLUSAE",
                 "batchtopk4": "SwitchSAELens", "switch_skip_transcoder": "SwitchSkipTranscoderSAELens",
                 "topk_transcoder": "SwitchTranscoderSAELens"}
EXPERT_CLASS = {"switch": "TopKSAE", "batchtopk4": "JumpReLUSAE",
                "switch_skip_transcoder": "SwitchSkipTranscoderSAELens"}
"""Each expert's SAELens class under --per-expert."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A few trained steps of each kind (trained weights: biases off zero, decoders moved, BatchTopK thresholds
    set)."""
    out = {}
    for name, (kind, experts) in RUNS.items():
        run = small_run(tmp_path_factory.mktemp(name), kind=kind, steps=4, checkpoint_every=4, log_every=4)
        run = replace(run, sae=replace(run.sae, num_experts=experts, **TRANSCODERS.get(name, {})))
        validate(run)
        Trainer(run, build_activation_source(run)).train()
        out[name] = run.trainer.out_dir
    return out


def skip_term(sae, x_TD: torch.Tensor) -> torch.Tensor | float:
    """A skip transcoder's W_skip x, which SAELens's forward adds and its `decode` does not; 0 otherwise."""
    return 0.0 if sae.w_skip is None else x_TD @ sae.w_skip.T


def dense_codes(sae, x_TD: torch.Tensor) -> torch.Tensor:
    latents = sae.encode(x_TD)
    codes_TM = torch.zeros(x_TD.shape[0], sae.d_sae)
    return codes_TM.scatter_(1, latents.indices_TK, latents.values_TK.float())


@pytest.mark.parametrize("name", list(RUNS))
def test_export_loads_in_saelens_with_equal_codes_and_reconstructions(name, runs, command, tmp_path):
    """Equal to sae-dist's eval mode (load_sae's model): BatchTopK selects by its thresholds, all set (> 0); a
    transcoder's decode too (d_out = 48 from d_in = 64)."""
    out = tmp_path / "saelens"
    assert command("export.py", runs[name], "--format", "saelens", "--out", str(out)).status == 0
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    lens = SAE.load_from_disk(out)
    assert type(lens).__name__ == SAELENS_CLASS[name]
    ours = load_sae(runs[name])
    assert not ours.training
    if ours.kind == "batchtopk":
        assert (ours.experts.threshold_N > 0).all()
    x_TD = torch.randn(64, ours.d_in) * 2
    with torch.no_grad():
        codes_TM = dense_codes(ours, x_TD)
        assert torch.allclose(lens.encode(x_TD), codes_TM, atol=1e-5)
        decoded_TO = ours.decode(ours.encode(x_TD), x_TD)
        assert decoded_TO.shape == (64, TRANSCODERS.get(name, {}).get("d_out", ours.d_in))
        assert torch.allclose(lens.decode(codes_TM) + skip_term(ours, x_TD), decoded_TO, atol=1e-5)
        assert torch.allclose(lens(x_TD), ours(x_TD).x_hat_TD, atol=1e-5)
    assert lens.cfg.metadata.hook_name == "blocks.8.hook_resid_post"


@pytest.mark.parametrize("name", list(EXPERT_CLASS))
def test_switch_exports_as_one_sae_per_expert(name, runs, command, tmp_path):
    """SAELens's 'topk' or 'jumprelu' per expert; a TopK transcoder's experts are Switch transcoders of one expert."""
    out = tmp_path / "experts"
    assert command("export.py", runs[name], "--out", str(out), "--per-expert").status == 0
    ours = load_sae(runs[name])
    x_TD = torch.randn(256, ours.d_in) * 2
    with torch.no_grad():
        routing = ours.router(x_TD)
        x_hat_TD, codes_TM = ours(x_TD).x_hat_TD, dense_codes(ours, x_TD)
    width = ours.latents_per_expert
    for e in range(ours.cfg.num_experts):
        lens = SAE.load_from_disk(out / f"expert_{e:03d}")
        assert type(lens).__name__ == EXPERT_CLASS[name]
        assert getattr(lens.cfg, "k", ours.cfg.k) == ours.cfg.k  # TopK experts keep k
        mine = routing.expert_T == e
        assert mine.any()
        gate_T1 = routing.gate_T[mine, None]
        with torch.no_grad():
            z_TM = lens.encode(x_TD[mine])
            assert torch.allclose(gate_T1 * z_TM, codes_TM[mine, e * width:(e + 1) * width], atol=1e-5)
            b_dec, skip_TD = ours.b_dec, skip_term(ours, x_TD[mine])
            assert torch.allclose(gate_T1 * (lens.decode(z_TM) - b_dec) + b_dec + skip_TD, x_hat_TD[mine], atol=1e-5)


def test_bad_input_is_one_line_and_writes_nothing(runs, command, tmp_path):
    out = tmp_path / "new"
    command("export.py", runs["switch"], "--format", "sparsify", "--out", str(out)).one_line_error(
        "--format='sparsify' is unknown; allowed: saelens")
    command("export.py", str(tmp_path / "nowhere"), "--out", str(out)).one_line_error("nowhere")
    command("export.py", runs["topk"], "--out", str(out), "--per-expert").one_line_error(
        "--per-expert needs a Switch SAE")
    (tmp_path / "taken").mkdir()
    command("export.py", runs["switch"], "--out", str(tmp_path / "taken")).one_line_error("already exists")
    assert not out.exists() and not (tmp_path / "new.tmp").exists()


def test_switch_architecture_names_an_unknown_activation():
    with pytest.raises(ValueError, match="activation='jumprelu' is unknown; allowed: topk, threshold"):
        sae_dist.interop.saelens_switch.SwitchSAELensConfig(d_in=4, d_sae=8, activation="jumprelu")
