"""Transcoders (docs/math.md section 9) against the dense oracle of tests/reference.py: forward, loss terms, encode/decode and
every gradient, for every architecture and both expert-compute formulations, with and without the skip; an SAE is
the transcoder with y = x and tied biases; initialisation; the synthetic pairs."""

from __future__ import annotations

import pytest
import torch

from sae_dist.config import ConfigError, DataConfig, RunConfig, SAEConfig
from sae_dist.data.synthetic import SyntheticSource
from sae_dist.flops import flops_per_token
from sae_dist.models import build_sae
from sae_dist.models.losses import total_loss
from sae_dist.train.init import geometric_median, init_biases_from_batch
from sae_dist.validation import validate
from tests.models.model_helpers import (
    assert_same_forward_and_grads,
    make_switch,
    make_transcoder,
    routed_inputs,
    transcoder_target,
)
from tests.reference import naive_terms

D, D_OUT = 12, 7
FORMULATIONS = [("sparse", "gather"), ("gemm", "gemm")]


def batch(d_out: int = D_OUT):
    """40 tokens over 4 experts (expert 2 gets none) and their targets."""
    x_TD = routed_inputs(D, 4, [17, 22, 0, 1]).double()
    return x_TD, transcoder_target(x_TD, d_out)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("kind", ["switch", "topk"])
def test_topk_experts_equal_the_dense_oracle(kind, formulation, skip):
    """With AuxK over half the latents: forward, terms (AuxK against y's residual and variance), encode, every
    gradient; decode(encode(x), x) is the forward's y_hat."""
    sae = make_transcoder(kind, D_OUT, skip, auxk_alpha=0.5, formulation=formulation)
    x_TD, y_TO = batch()
    dead_L = torch.rand(64, generator=torch.Generator().manual_seed(5)) < 0.5
    out = assert_same_forward_and_grads(sae, x_TD, dead_L, y_TD=y_TO)
    assert out.x_hat_TD.shape == (40, D_OUT) and out.aux_recon_TD.shape == (40, D_OUT)
    torch.testing.assert_close(sae.decode(sae.encode(x_TD), x_TD), sae(x_TD).x_hat_TD, rtol=1e-6, atol=1e-6)
    assert (sae.w_skip is not None) == skip


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("kind", ["batchtopk", "relu"])
def test_batchtopk_and_relu_equal_the_dense_oracle(kind, skip):
    sae = make_transcoder(kind, D_OUT, skip, latents=64 if kind == "batchtopk" else 32)
    x_TD, y_TO = batch()
    out = sae(x_TD)
    terms = sae.loss_terms(y_TO, out)
    ref_x_hat, _, ref_terms = naive_terms(sae, x_TD, y_TD=y_TO)
    torch.testing.assert_close(out.x_hat_TD, ref_x_hat, rtol=1e-6, atol=1e-6)
    assert terms.keys() == ref_terms.keys()
    weights = {name: 0.3 for name in terms if name != "rec"}
    grads = torch.autograd.grad(total_loss(terms, weights), list(sae.parameters()))
    ref_grads = torch.autograd.grad(total_loss(ref_terms, weights), list(sae.parameters()))
    for (name, _), grad, ref in zip(sae.named_parameters(), grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        assert ref.abs().sum() > 0, name
    sae.eval()
    torch.testing.assert_close(sae.decode(sae.encode(x_TD), x_TD), sae(x_TD).x_hat_TD, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["switch", "topk", "relu"])
def test_an_sae_is_the_transcoder_with_y_equal_x_and_tied_biases(kind):
    """Weights copied, b_in = b_out = b_pre, y = x: the same forward, and b_pre's gradient is b_in's plus b_out's."""
    sae = make_switch(4, 64, 3, D, kind=kind) if kind != "relu" else build_sae(
        SAEConfig(kind="relu", num_latents=32, num_experts=1), D, 3).double()
    transcoder = build_sae(sae.cfg.__class__(**{**vars(sae.cfg), "d_out": D}), D, 3).double()
    state = {name: value for name, value in sae.state_dict().items() if name != "b_pre"}
    state.update(b_in=sae.b_pre.detach(), b_out=sae.b_pre.detach())
    transcoder.load_state_dict(state)
    x_TD = routed_inputs(D, 4, [17, 22, 0, 1]).double()
    out, tc_out = sae(x_TD), transcoder(x_TD)
    torch.testing.assert_close(tc_out.x_hat_TD, out.x_hat_TD, rtol=0, atol=0)
    weights = sae.loss_weights(0.5)
    loss = total_loss(sae.loss_terms(x_TD, out), weights)
    tc_loss = total_loss(transcoder.loss_terms(x_TD, tc_out), weights)
    (b_pre_grad,) = torch.autograd.grad(loss, [sae.b_pre])
    b_in_grad, b_out_grad = torch.autograd.grad(tc_loss, [transcoder.b_in, transcoder.b_out])
    torch.testing.assert_close(b_in_grad + b_out_grad, b_pre_grad, rtol=1e-10, atol=1e-10)


def test_split_init_and_shapes():
    """Rows [x | y] split at d_in; b_in and b_router from x's geometric median, b_out from y's; W_skip starts at 0;
    the decoder rows are unit norm and d_out wide."""
    cfg = SAEConfig(kind="switch", num_latents=64, num_experts=4, k=3, d_out=D_OUT, skip=True)
    sae = build_sae(cfg, D, seed=1)
    assert not sae.w_skip.any() and sae.experts.w_dec.shape == (4, 16, D_OUT)
    torch.testing.assert_close(sae.experts.w_dec.norm(dim=-1), torch.ones(4, 16))
    x_TD, y_TO = (t.float() for t in batch())
    rows_TC = torch.cat([x_TD, y_TO], 1)
    split_x, split_y = sae.split_batch(rows_TC)
    assert torch.equal(split_x, x_TD) and torch.equal(split_y, y_TO)
    init_biases_from_batch(sae, rows_TC)
    assert torch.equal(sae.b_in, geometric_median(x_TD)) and torch.equal(sae.router.b_router, sae.b_in)
    assert torch.equal(sae.b_out, geometric_median(y_TO))
    with pytest.raises(ValueError, match="not \\[x \\| y\\] of widths 12 \\+ 7"):
        sae.split_batch(x_TD)
    with pytest.raises(ValueError, match="needs the input|pass the input"):
        sae.decode(sae.encode(x_TD))
    assert sae.b_dec is sae.b_out and tuple(sae.W_dec.shape) == (64, D_OUT)


def test_flops_count_the_decoder_at_d_out_and_the_skip_gemm():
    sae_cfg = SAEConfig(kind="topk", num_latents=64, num_experts=1, k=4)
    tc_cfg = SAEConfig(kind="topk", num_latents=64, num_experts=1, k=4, d_out=20)
    skip_cfg = SAEConfig(kind="topk", num_latents=64, num_experts=1, k=4, d_out=20, skip=True)
    sae, tc, skip = (flops_per_token(cfg, 10) for cfg in (sae_cfg, tc_cfg, skip_cfg))
    assert tc.forward - sae.forward == 2 * 4 * (20 - 10) and tc.backward - sae.backward == 4 * 4 * (20 - 10)
    assert skip.forward - tc.forward == 2 * 10 * 20 and skip.backward - tc.backward == 4 * 10 * 20
    assert tc.encoder_paper == sae.encoder_paper


def test_synthetic_pairs_keep_the_sae_inputs_and_follow_the_known_map():
    """x is the SAE source's x bit for bit; y = A x + sum_i m_i^2 g_i over the same features."""
    sae_source = SyntheticSource(16, 64, 4, 0.01, seed=3)
    pairs = SyntheticSource(16, 64, 4, 0.01, seed=3, d_out=9)
    assert pairs.d_model == 25
    rows_TC, x_TD = pairs.next_batch(50), sae_source.next_batch(50)
    assert torch.equal(rows_TC[:, :16], x_TD)
    linear_TO = x_TD @ pairs.target_map.T
    sparse_TO = rows_TC[:, 16:] - linear_TO
    # The sparse part is a non-negative combination of the target directions: each row's part lies in their span.
    coef_TF = torch.linalg.lstsq(pairs.target_features.T.double(), sparse_TO.T.double()).solution.T
    torch.testing.assert_close(coef_TF @ pairs.target_features.double(), sparse_TO.double(), rtol=1e-4, atol=1e-4)
    assert sparse_TO.norm(dim=1).mean() > 1 and linear_TO.norm(dim=1).mean() > 1


def test_config_refuses_what_a_transcoder_cannot_be():
    run = RunConfig(sae=SAEConfig(skip=True), data=DataConfig(source="synthetic"))
    with pytest.raises(ConfigError, match="^sae.skip=true is a transcoder's skip connection: it needs sae.d_out"):
        validate(run)
    run = RunConfig(sae=SAEConfig(d_out=0), data=DataConfig(source="synthetic"))
    with pytest.raises(ConfigError, match="^sae.d_out=0 must be positive or null"):
        validate(run)
    run = RunConfig(sae=SAEConfig(d_out=768))
    with pytest.raises(ConfigError, match="^sae.d_out=768 makes a transcoder: with data.source=lm set model.target_hookpoint"):
        validate(run)


@pytest.mark.parametrize(("kind", "skip", "saelens_class"), [
    ("relu", False, "Transcoder"), ("relu", True, "SkipTranscoder"), ("batchtopk", True, "JumpReLUSkipTranscoder"),
])
def test_saelens_export_of_dense_transcoders_loads_with_equal_codes_and_outputs(tmp_path, kind, skip, saelens_class):
    """SAELens's transcoders do not centre their input: b_in is folded into b_enc. A BatchTopK transcoder (N = 1,
    eval mode: its thresholds) is a JumpReLU transcoder."""
    saelens = pytest.importorskip("sae_lens")
    from sae_dist.interop.saelens import export_saelens

    sae = make_transcoder(kind, D_OUT, skip, num_experts=1, latents=32).float().eval()
    if kind == "batchtopk":
        with torch.no_grad():
            sae.experts.threshold_N.fill_(0.3)
    folder = export_saelens(sae, RunConfig(sae=sae.cfg), tmp_path / "saelens")[0]
    lens = saelens.SAE.load_from_disk(folder)
    assert type(lens).__name__ == saelens_class and lens.cfg.d_out == D_OUT
    x_TD = batch()[0].float()
    latents = sae.encode(x_TD)
    codes_TM = torch.zeros(len(x_TD), 32).scatter_(1, latents.indices_TK, latents.values_TK.float())
    torch.testing.assert_close(lens.encode(x_TD), codes_TM, rtol=1e-5, atol=1e-5)
    assert (codes_TM > 0).any() and not (codes_TM > 0).all()
    torch.testing.assert_close(lens(x_TD), sae(x_TD).x_hat_TD, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize(("kind", "num_experts"), [("switch", 4), ("topk", 1), ("batchtopk", 4)])
def test_saelens_export_of_routed_and_topk_transcoders_loads_with_equal_outputs(tmp_path, kind, num_experts, skip):
    """SAELens has no TopK or routed transcoder: they load as the registered Switch transcoder (a dense TopK one
    with N = 1), b_in folded into b_enc, W_skip applied by the forward and not by `decode`, as SAELens's own."""
    saelens = pytest.importorskip("sae_lens")
    import sae_dist.interop.saelens_switch  # noqa: F401  (registers the Switch architectures)
    from sae_dist.interop.saelens import export_saelens

    sae = make_transcoder(kind, D_OUT, skip, num_experts=num_experts, latents=64).float().eval()
    if kind == "batchtopk":
        with torch.no_grad():
            sae.experts.threshold_N.copy_(torch.tensor([0.2, 0.3, 0.25, 0.1]))
    folder = export_saelens(sae, RunConfig(sae=sae.cfg), tmp_path / "saelens")[0]
    lens = saelens.SAE.load_from_disk(folder)
    assert type(lens).__name__ == f"Switch{'Skip' if skip else ''}TranscoderSAELens"
    assert (lens.cfg.d_in, lens.cfg.d_out, lens.cfg.num_experts) == (D, D_OUT, num_experts)
    x_TD = torch.randn(200, D, generator=torch.Generator().manual_seed(6)) * 2
    latents = sae.encode(x_TD)
    codes_TM = torch.zeros(len(x_TD), 64).scatter_(1, latents.indices_TK, latents.values_TK.float())
    y_hat_TO = sae.decode(latents, x_TD)
    with torch.no_grad():
        torch.testing.assert_close(lens.encode(x_TD), codes_TM, rtol=1e-5, atol=1e-5)
        skip_TO = x_TD @ sae.w_skip.T if skip else 0.0
        torch.testing.assert_close(lens.decode(codes_TM) + skip_TO, y_hat_TO, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lens(x_TD), y_hat_TO, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lens(x_TD), sae(x_TD).x_hat_TD, rtol=1e-5, atol=1e-5)
    assert (codes_TM > 0).any() and not (codes_TM > 0).all()
    if num_experts > 1:  # every expert is chosen somewhere
        assert sae.router(x_TD).expert_T.unique().numel() == num_experts
    rebuilt = type(lens).from_dict(lens.cfg.to_dict())
    assert type(rebuilt) is type(lens) and rebuilt.cfg.k == sae.cfg.k


PER_EXPERT_CLASS = [("switch", "SwitchSkipTranscoderSAELens"), ("batchtopk", "JumpReLUSkipTranscoder")]
"""sae.kind -> each expert's SAELens class when a skip transcoder exports per expert."""


@pytest.mark.parametrize(("kind", "expert_class"), PER_EXPERT_CLASS)
def test_saelens_export_per_expert_of_routed_transcoders(tmp_path, kind, expert_class):
    """Expert e's SAE gives the latents z of a token routed to e and z W_dec^e + b_out before the gate:
    y_hat = p_e (decode(z) - b_out) + b_out + W_skip x."""
    saelens = pytest.importorskip("sae_lens")
    import sae_dist.interop.saelens_switch  # noqa: F401  (registers the Switch architectures)
    from sae_dist.interop.saelens import export_saelens

    sae = make_transcoder(kind, D_OUT, True, latents=64).float().eval()
    if kind == "batchtopk":
        with torch.no_grad():
            sae.experts.threshold_N.fill_(0.2)
    folders = export_saelens(sae, RunConfig(sae=sae.cfg), tmp_path / "experts", per_expert=True)
    x_TD = torch.randn(200, D, generator=torch.Generator().manual_seed(6)) * 2
    latents, routing = sae.encode(x_TD), sae.router(x_TD)
    codes_TM = torch.zeros(len(x_TD), 64).scatter_(1, latents.indices_TK, latents.values_TK.float())
    y_hat_TO, skip_TO = sae.decode(latents, x_TD), x_TD @ sae.w_skip.T
    for e, folder in enumerate(folders):
        lens = saelens.SAE.load_from_disk(folder)
        assert type(lens).__name__ == expert_class
        mine = routing.expert_T == e
        gate_T1, b_out = routing.gate_T[mine, None], sae.b_out
        with torch.no_grad():
            z_TM = lens.encode(x_TD[mine])
            torch.testing.assert_close(gate_T1 * z_TM, codes_TM[mine, e * 16 : (e + 1) * 16], rtol=1e-5, atol=1e-5)
            y_TO = gate_T1 * (lens.decode(z_TM) - b_out) + b_out + skip_TO[mine]
            torch.testing.assert_close(y_TO, y_hat_TO[mine], rtol=1e-5, atol=1e-5)
        assert mine.any() and (z_TM > 0).any()


@pytest.mark.parametrize("skip", [False, True])
def test_preflight_counts_a_transcoders_parameters(skip):
    """The memory and checkpoint estimates count d_out-wide decoder rows and the skip (to within b_enc's M, which a
    Switch SAE does not have)."""
    from sae_dist.train.preflight import sae_parameters

    cfg = SAEConfig(kind="switch", num_latents=256, num_experts=4, k=4, d_out=48, skip=skip)
    actual = sum(p.numel() for p in build_sae(cfg, 16, seed=0).parameters())
    assert sae_parameters(cfg, 16) == actual + 256
