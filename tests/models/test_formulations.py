"""Every formulation of the expert compute (sparse or GEMM encoder backward, gather or GEMM decoder, grouped_mm or
its per-expert fallback, weight gradients in place or through autograd) equals the dense-then-mask oracle; AuxK's
candidate lists and the float32 router are checked here too."""

import copy

import pytest
import torch
from model_helpers import assert_same_forward_and_grads, make_switch, routed_inputs

from sae_dist.models import expert_compute
from sae_dist.models.auxk import DeadCandidates, candidates_of_width, dead_candidates
from sae_dist.models.formulation import GEMM_MAX_WIDTH, choose_compute
from sae_dist.models.gemm_compute import GemmCompute, expert_linear
from sae_dist.models.routing import ExpertGroups, Router
from sae_dist.models.sparse_compute import SparseCompute

FORMULATIONS = [(encoder, decoder) for encoder in ("sparse", "gemm") for decoder in ("gather", "gemm")]
"""(sae.encoder_backward_kernel, sae.decoder_kernel) pairs; float32 runs grouped_mm, float64 its per-expert fallback."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_switch_with_auxk_matches_naive(formulation, dtype):
    """An expert without tokens, one with a single token, k = all of an expert's latents, half the latents dead."""
    torch.manual_seed(0)
    sae = make_switch(num_experts=4, latents=64, k=16, d=12, auxk_alpha=0.5, dtype=dtype, formulation=formulation)
    x_TD = routed_inputs(12, 4, [7, 1, 0, 12]).to(dtype)
    dead_L = torch.rand(64, generator=torch.Generator().manual_seed(1)) < 0.5
    out = assert_same_forward_and_grads(sae, x_TD, dead_L, grad_atol=1e-5)
    assert (out.latent_values_RK == 0).any(), "expected fewer positive pre-activations than k"


@pytest.mark.parametrize("auxk_alpha", [0.0, 0.5])
def test_sparse_backwards_sort_the_shared_ids_once(monkeypatch, auxk_alpha):
    """The decoder's and the encoder's backward share one sort of the codes' ids, and their gradients still equal
    the oracle's; with AuxK, whose selections join the encoder's ids, three: the codes', the encoder's and the
    AuxK decoder's."""
    torch.manual_seed(2)
    sae = make_switch(num_experts=4, latents=64, k=6, d=12, auxk_alpha=auxk_alpha, dtype=torch.float64,
                      formulation=("sparse", "gather"))
    x_TD = routed_inputs(12, 4, [5, 3, 0, 9])
    sorts = []
    original = expert_compute.latent_major
    monkeypatch.setattr(expert_compute, "latent_major", lambda *args: sorts.append(args) or original(*args))
    assert_same_forward_and_grads(sae, x_TD, torch.arange(64) % 4 == 0 if auxk_alpha else None, grad_atol=1e-8)
    assert len(sorts) == (3 if auxk_alpha else 1)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_dense_topk_with_bias_and_few_dead_matches_naive(formulation):
    torch.manual_seed(1)
    sae = make_switch(num_experts=1, latents=32, k=4, d=8, kind="topk", dtype=torch.float32, formulation=formulation)
    x_TD = torch.randn(9, 8)
    dead_L = torch.zeros(32, dtype=torch.bool)
    dead_L[[3, 17]] = True  # fewer dead latents than k_aux = 5
    assert_same_forward_and_grads(sae, x_TD, dead_L, grad_atol=1e-5)


@pytest.mark.parametrize(
    ("device", "width", "settings", "expected"),
    [
        ("cpu", 64, ("auto", "auto"), ("sparse", "sparse")),
        ("cuda", GEMM_MAX_WIDTH, ("auto", "auto"), ("gemm", "gemm")),
        ("cuda", GEMM_MAX_WIDTH + 1, ("auto", "auto"), ("sparse", "sparse")),
        ("cpu", 64, ("gemm", "gather"), ("gemm", "sparse")),
        ("cuda", 64, ("sparse", "auto"), ("sparse", "gemm")),
    ],
)
def test_compute_rule(device, width, settings, expected):
    """'auto' is sparse on a CPU and GEMM on a GPU up to GEMM_MAX_WIDTH; explicit settings pass through; one compute
    serves both halves when they are of one formulation."""
    kinds = {SparseCompute: "sparse", GemmCompute: "gemm"}
    encoder, decoder = choose_compute(*settings, torch.device(device), width)
    assert (kinds[type(encoder)], kinds[type(decoder)]) == expected
    assert (encoder is decoder) == (expected[0] == expected[1])


def test_compute_is_chosen_again_when_the_bank_moves(monkeypatch):
    """A model is built on the CPU and then moved: the move chooses its compute for the new device; a change of
    dtype keeps the compute and what it owns."""
    from sae_dist.models import experts

    sae = make_switch(num_experts=2, latents=16, k=2, d=6, dtype=torch.float32)
    compute = sae.experts.encoder_compute
    assert isinstance(compute, SparseCompute) and sae.experts.decoder_compute is compute
    devices = []
    monkeypatch.setattr(experts, "choose_compute",
                        lambda *args: devices.append(args[2]) or (GemmCompute(), GemmCompute()))
    sae.double()
    assert sae.experts.encoder_compute is compute and devices == []
    sae.to("meta")
    assert devices == [torch.device("meta")] and isinstance(sae.experts.encoder_compute, GemmCompute)


def test_each_model_owns_its_in_place_weight_grads():
    """`in_place_weight_grads` on one model leaves another's gradients to autograd; a deep copy shares no buffer."""
    torch.manual_seed(4)
    first = make_switch(num_experts=2, latents=16, k=2, d=6, dtype=torch.float32, formulation=("sparse", "gather"))
    second = copy.deepcopy(first)
    assert second.experts.encoder_compute is second.experts.decoder_compute
    assert second.experts.encoder_compute is not first.experts.encoder_compute
    x_TD = routed_inputs(6, 2, [5, 3]).float()
    with first.in_place_weight_grads(True):
        first_loss, second_loss = (m.loss_terms(x_TD, m(x_TD))["rec"] for m in (first, second))
    assert not second.experts.encoder_compute.in_place and not first.experts.encoder_compute.in_place
    first_loss.backward()
    second_loss.backward()
    for ours, theirs in zip(first.parameters(), second.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-7)
    first_buffers = [first.experts.w_enc.grad, first.experts.w_dec.grad]
    first.zero_grad(set_to_none=True)
    second.zero_grad(set_to_none=True)
    with first.in_place_weight_grads(True), second.in_place_weight_grads(True):
        for m in (first, second):
            m.loss_terms(x_TD, m(x_TD))["rec"].backward()
    assert first.experts.w_enc.grad is first_buffers[0] and first.experts.w_dec.grad is first_buffers[1]
    assert second.experts.w_dec.grad is not first_buffers[1]


def _grouped_rows(counts: list[int], d: int, host_counts: bool):
    rows_RD = torch.randn(sum(counts), d, generator=torch.Generator().manual_seed(2))
    counts_L = torch.tensor(counts)
    return rows_RD, ExpertGroups.from_counts(counts_L, sum(counts), counts if host_counts else None)


def test_sparse_encoder_grouped_gemm_forward_equals_the_per_expert_loop():
    """Without counts on the host (a GPU), the sparse encoder runs one grouped GEMM instead of its loop."""
    sae = make_switch(num_experts=3, latents=48, k=4, d=8, auxk_alpha=0.5, dtype=torch.float32)
    bank = sae.experts
    aux = dead_candidates(torch.arange(48) % 3 == 0, 3)
    outputs = []
    for host_counts in (True, False):
        rows_RD, groups = _grouped_rows([5, 0, 6], 8, host_counts)
        outputs.append(SparseCompute().encode(rows_RD, bank.w_enc, None, groups, 4, aux, 5)[:4])
    for loop, grouped in zip(*outputs):
        torch.testing.assert_close(grouped, loop, rtol=1e-6, atol=1e-6)


def _sparse_loss(compute, bank, rows_RD, groups, upstream_RD):
    codes = compute.encode(rows_RD, bank.w_enc, None, groups, 4, None, 0)
    return (compute.decode(codes.values_RK, codes.indices_RK, bank.w_dec, groups, codes.latent_order)
            * upstream_RD).sum()


@pytest.mark.parametrize("existing_grad", [False, True])
def test_weight_grads_in_place_equal_autograd(existing_grad):
    """Inside in_place_weight_grads(True) the sparse compute adds its weight gradients to .grad itself."""
    sae = make_switch(num_experts=3, latents=48, k=4, d=8, kind="switch", dtype=torch.float32)
    bank, compute = sae.experts, SparseCompute()
    rows_RD, groups = _grouped_rows([5, 0, 6], 8, True)
    upstream_RD = torch.randn(11, 8)

    def loss(in_place: bool):
        with compute.in_place_weight_grads(in_place):
            return _sparse_loss(compute, bank, rows_RD, groups, upstream_RD)

    expected = torch.autograd.grad(loss(False), [bank.w_enc, bank.w_dec])
    start = [torch.randn_like(bank.w_enc), torch.randn_like(bank.w_dec)] if existing_grad else [None, None]
    bank.w_enc.grad, bank.w_dec.grad = [None if s is None else s.clone() for s in start]
    loss(True).backward()
    for param, grad, before in zip([bank.w_enc, bank.w_dec], expected, start):
        torch.testing.assert_close(param.grad, grad if before is None else before + grad, rtol=1e-6, atol=1e-6)
    assert expected[0].abs().sum() > 0 and expected[1].abs().sum() > 0


@pytest.mark.parametrize("counts", [[5, 0, 6], [0, 0, 0]])
def test_weight_grads_overwrite_the_previous_steps_buffer(counts):
    """With .grad None, the in-place backward makes the weight's buffer of the previous step its .grad again and
    overwrites it: whatever the buffer held (NaN here) is ignored, in the rows of an expert without tokens too,
    and also when no row has a token at all."""
    sae = make_switch(num_experts=3, latents=48, k=4, d=8, kind="switch", dtype=torch.float32)
    bank, compute = sae.experts, SparseCompute()
    rows_RD, groups = _grouped_rows(counts, 8, True)
    upstream_RD = torch.randn(sum(counts), 8)

    def loss():
        return _sparse_loss(compute, bank, rows_RD, groups, upstream_RD)

    expected = torch.autograd.grad(loss(), [bank.w_enc, bank.w_dec])
    with compute.in_place_weight_grads(True):
        loss().backward()
    buffers = [bank.w_enc.grad, bank.w_dec.grad]
    for buffer in buffers:
        buffer.fill_(float("nan"))
    bank.w_enc.grad = bank.w_dec.grad = None
    with compute.in_place_weight_grads(True):
        loss().backward()
    for param, grad, buffer in zip([bank.w_enc, bank.w_dec], expected, buffers):
        assert param.grad is buffer
        torch.testing.assert_close(param.grad, grad, rtol=1e-6, atol=1e-6)


def test_gemm_formulation_takes_an_expanded_upstream_gradient():
    """grouped_mm's backward rejects stride-0 gradients (from .sum()); the formulation makes them contiguous."""
    sae = make_switch(num_experts=3, latents=48, k=4, d=8, dtype=torch.float32)
    rows_RD, groups = _grouped_rows([5, 0, 6], 8, False)
    compute = GemmCompute()
    codes = compute.encode(rows_RD, sae.experts.w_enc, None, groups, 4, None, 0)
    compute.decode(codes.values_RK, codes.indices_RK, sae.experts.w_dec, groups).sum().backward()
    assert sae.experts.w_enc.grad.abs().sum() > 0


def test_auxk_selection_does_not_depend_on_the_candidate_width():
    """Padding candidates (from a lagged, larger count) change nothing, bit for bit: resume stays exact."""
    sae = make_switch(num_experts=2, latents=32, k=3, d=8, kind="switch", auxk_alpha=0.5, dtype=torch.float32)
    x_TD = routed_inputs(8, 2, [6, 4]).float()
    dead_NM = (torch.rand(32, generator=torch.Generator().manual_seed(0)) < 0.3).view(2, 16)
    runs = []
    for width in (int(dead_NM.sum(1).max()), 16):
        sae.zero_grad(set_to_none=True)
        out = sae(x_TD, aux_candidates=candidates_of_width(dead_NM, width))
        sum(sae.loss_terms(x_TD, out).values()).backward()
        runs.append([out.x_hat_TD, out.aux_recon_TD] + [p.grad.clone() for p in sae.parameters()])
    for exact, padded in zip(*runs):
        torch.testing.assert_close(padded, exact, rtol=0, atol=0)


@pytest.mark.parametrize("round_width", [False, True])
def test_dead_candidates_cover_every_dead_latent_without_reading_the_device(round_width):
    """Simulated training: latents fire at random; each step's candidates hold every dead latent of that step
    (padded to a power of two, or the expert's width, with `round_width`: the widths of the CUDA graphs)."""
    num_experts, width, batch, dead_tokens = 2, 24, 100, 350
    g = torch.Generator().manual_seed(3)
    counters_L = torch.zeros(num_experts * width, dtype=torch.long)
    tracker = DeadCandidates(num_experts, dead_tokens, batch, tokens_seen=0, round_width=round_width)
    widths = set()
    seen_dead = 0
    for step in range(12):
        candidates = tracker.for_step(counters_L)
        dead_NM = (counters_L >= dead_tokens).view(num_experts, width)
        if candidates is None:
            assert step * batch < dead_tokens and not dead_NM.any()
        else:
            listed_NM = torch.zeros_like(dead_NM).scatter(1, candidates.ids_NC, candidates.dead_NC)
            assert torch.equal(listed_NM, dead_NM)
            seen_dead += int(dead_NM.sum())
            widths.add(candidates.ids_NC.shape[1])
        fired_L = torch.rand(counters_L.shape, generator=g) < 0.3
        counters_L = (counters_L + batch).masked_fill(fired_L, 0)
        tracker.after_update(counters_L)
    assert seen_dead > 0
    if round_width:
        assert widths <= {0, 1, 2, 4, 8, 16, width} and len(widths) > 1, widths


def test_router_runs_in_float32_under_bf16_autocast():
    router = Router(64, 8, torch.Generator().manual_seed(0))
    x_TD = 3 * torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    plain = router(x_TD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = router(x_TD)
    assert autocast.probs_TN.dtype == torch.float32
    assert torch.equal(autocast.expert_T, plain.expert_T)
    torch.testing.assert_close(autocast.probs_TN, plain.probs_TN, rtol=0, atol=0)


def test_sparse_encoder_in_column_chunks_matches_naive():
    """Wide experts are encoded in chunks of latents (each weight read once) whose TopKs are merged: shrink the
    chunk so that 16 latents span four chunks, with AuxK candidates in every chunk."""
    torch.manual_seed(3)
    sae = make_switch(num_experts=4, latents=64, k=5, d=12, auxk_alpha=0.5, formulation=("sparse", "gather"))
    compute = sae.experts.encoder_compute
    compute.chunk_elements, compute.min_chunk_columns = 4 * 7, 4
    x_TD = routed_inputs(12, 4, [7, 1, 0, 12])
    dead_L = torch.rand(64, generator=torch.Generator().manual_seed(4)) < 0.5
    assert_same_forward_and_grads(sae, x_TD, dead_L)


def test_encoder_pre_activations_stay_in_the_autocast_dtype():
    """Under bf16 autocast the encoder bias (dense TopK's) joins the pre-activations inside the bf16 GEMM, which
    accumulates in float32 and rounds once: TopK runs over a bf16 [rows, M] tensor, never a float32 copy of it."""
    sae = make_switch(num_experts=1, latents=48, k=4, d=8, kind="topk", dtype=torch.float32)
    bank = sae.experts
    with torch.no_grad():
        bank.b_enc.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    rows_RD, groups = _grouped_rows([11], 8, host_counts=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values_RK, ids_RK = GemmCompute().encode(rows_RD, bank.w_enc, bank.b_enc, groups, 4, None, 0)[:2]
    bf16 = [t.bfloat16().float() for t in (rows_RD, bank.w_enc[0], bank.b_enc[0])]
    pre_RM = (bf16[0] @ bf16[1].T + bf16[2]).bfloat16()
    expected_values, expected_ids = torch.topk(pre_RM, 4)
    assert values_RK.dtype == torch.bfloat16
    torch.testing.assert_close(values_RK.sort(1).values, expected_values.relu().sort(1).values, rtol=0, atol=0)
    assert torch.equal(ids_RK.sort(1).values, expected_ids.sort(1).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_expert_linear_with_bias_equals_each_experts_affine_map(dtype):
    """The bias as an extra GEMM column (grouped_mm in float32, its per-expert loop in float64): x W_e^T + b_e per
    expert, an expert without rows among them, and the gradients of x, W and b."""
    generator = torch.Generator().manual_seed(6)
    rows_RD, groups = _grouped_rows([5, 0, 6], 8, host_counts=dtype == torch.float64)
    rows_RD = rows_RD.to(dtype).requires_grad_()
    w_NMD = torch.randn(3, 16, 8, generator=generator, dtype=dtype, requires_grad=True)
    b_NM = torch.randn(3, 16, generator=generator, dtype=dtype, requires_grad=True)
    upstream_RM = torch.randn(11, 16, generator=generator, dtype=dtype)
    pre_RM = expert_linear(rows_RD, w_NMD, groups, b_NM)
    expert_R = groups.expert_R
    expected_RM = torch.einsum("rd,rmd->rm", rows_RD, w_NMD[expert_R]) + b_NM[expert_R]
    torch.testing.assert_close(pre_RM, expected_RM)
    grads = torch.autograd.grad((pre_RM * upstream_RM).sum(), [rows_RD, w_NMD, b_NM])
    expected = torch.autograd.grad((expected_RM * upstream_RM).sum(), [rows_RD, w_NMD, b_NM])
    for grad, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, want)
    assert grads[2][1].abs().sum() == 0 and grads[2][0].abs().sum() > 0  # expert 1 has no rows
