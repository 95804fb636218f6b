"""The checks run inside each rank of a spawned gloo job (see spawn_harness); every rank runs every check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ep_helpers import (
    ROUTED_EXPERTS,
    GlobalBatchSource,
    copy_checkpoint,
    expert_slice,
    load_shard,
    local_latents,
    routed_batch,
    routed_model,
    shard_of,
    tiny_run,
)

from sae_dist.config import SAEConfig
from sae_dist.models.auxk import dead_candidates
from sae_dist.models.losses import total_loss
from sae_dist.parallel.all_to_all import AllToAllDispatcher
from sae_dist.parallel.expert_parallel import ExpertParallelContext
from sae_dist.parallel.mesh import ExpertMesh, build_mesh
from sae_dist.parallel.overlap import OverlappedAllToAllDispatcher
from sae_dist.parallel.permute import capacity
from sae_dist.run_dir import checkpoint_name
from sae_dist.train import checkpoint as ckpt
from sae_dist.train.trainer import Trainer
from tests.models.model_helpers import transcoder_target
from tests.reference import naive_forward

EXACT = dict(rtol=0, atol=0)
MODEL = dict(rtol=1e-5, atol=1e-6)
"""Float64 experts, but the router, gate and losses are float32 by design: the same operations on the same rows,
reduced over ranks in another order."""
TRAINING = dict(rtol=1e-5, atol=1e-6)
"""Float32 training, 6 Adam steps: all-reduce order and per-rank means change the rounding of gradients (the
largest difference measured is ~1e-7 after 6 and after 30 steps)."""


# --- dispatch with identity experts ---------------------------------------------------------------------------
def rank_routing(rank: int, num_experts: int) -> tuple[int, list[int]]:
    """(tokens, expert per token) of a rank: rank 1 has no tokens, expert 5 gets none from anyone."""
    tokens = [5, 0, 7, 3, 4, 6, 2, 1][rank]
    g = torch.Generator().manual_seed(100 + rank)
    experts = torch.randint(num_experts, (tokens,), generator=g)
    experts[experts == 5] = 6
    return tokens, experts.tolist()


def labelled_tokens(rank: int, experts: list[int]) -> torch.Tensor:
    """Rows [rank, position, expert, noise...], so every row says where it came from."""
    x_TD = torch.randn(len(experts), 6, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    x_TD[:, 0], x_TD[:, 1], x_TD[:, 2] = rank, torch.arange(len(experts)), torch.tensor(experts, dtype=torch.float64)
    return x_TD


def check_dispatch_identity(mesh: ExpertMesh, rank: int) -> None:
    num_experts = 8
    dispatcher = AllToAllDispatcher(num_experts, mesh.ep_group)
    group_ranks = dist.get_process_group_ranks(mesh.ep_group)
    _, experts = rank_routing(rank, num_experts)
    x_TD = labelled_tokens(rank, experts).requires_grad_()
    rows_RD, plan = dispatcher.dispatch(x_TD, torch.tensor(experts, dtype=torch.long))
    counts = plan.groups.counts
    # Expected: for each local expert, the rows of every source rank of the group in (rank, position) order.
    expected = []
    for expert in range(num_experts)[expert_slice(dispatcher)]:
        for source in group_ranks:
            _, source_experts = rank_routing(source, num_experts)
            expected += [(source, pos, expert) for pos, e in enumerate(source_experts) if e == expert]
    got = [tuple(int(v) for v in row) for row in rows_RD[:, :3].tolist()]
    assert got == expected, (got, expected)
    assert sum(counts) == len(expected) and len(counts) == dispatcher.num_local_experts
    if dispatcher.first_local_expert <= 5 < dispatcher.first_local_expert + dispatcher.num_local_experts:
        assert counts[5 - dispatcher.first_local_expert] == 0
    # Identity experts: combine returns the input, for any trailing shape and for integer rows too.
    assert plan.groups.counts_L.tolist() == counts
    assert torch.equal(dispatcher.dispatch_like(x_TD.detach(), plan), rows_RD.detach())
    assert torch.equal(dispatcher.dispatch_like(x_TD[:, :3] > 2, plan), rows_RD[:, :3] > 2)  # bool rows too
    y_TD = dispatcher.combine(rows_RD, plan)
    torch.testing.assert_close(y_TD, x_TD, **EXACT)
    torch.testing.assert_close(dispatcher.combine(rows_RD.view(-1, 2, 3), plan), x_TD.view(-1, 2, 3), **EXACT)
    ids_R = rows_RD[:, 1].long().detach()
    assert dispatcher.combine(ids_R, plan).tolist() == list(range(len(experts)))
    weight_TD = torch.randn_like(x_TD)
    (y_TD * weight_TD).sum().backward()
    torch.testing.assert_close(x_TD.grad, weight_TD, **EXACT)
    assert plan.kept_T is None


def check_dispatch_capacity(mesh: ExpertMesh, rank: int) -> None:
    """cf = 1 with 8 tokens and 4 experts: C = 2 per (rank, expert); the highest scores stay, ties by position."""
    num_experts, tokens = 4, 8
    dispatcher = AllToAllDispatcher(num_experts, mesh.ep_group, capacity_factor=1.0)
    limit = capacity(1.0, tokens, num_experts)
    assert limit == 2
    expert_T = (torch.tensor([0, 0, 0, 0, 0, 1, 1, 2]) + rank) % num_experts
    scores_T = torch.tensor([0.5, 0.9, 0.5, 0.7, 0.9, 0.6, 0.6, 0.3], dtype=torch.float64)
    x_TD = labelled_tokens(rank, expert_T.tolist()).requires_grad_()
    rows_RD, plan = dispatcher.dispatch(x_TD, expert_T, scores_T)
    kept_T = plan.kept_T
    # Expert of the five: keeps the two 0.9s (positions 1, 4); the 0.6 pair and the single token all fit.
    assert kept_T.tolist() == [False, True, False, False, True, True, True, True]
    assert torch.equal(dispatcher.dispatch_like(x_TD.detach(), plan), rows_RD.detach())  # dropped ones not sent
    sent_N = torch.bincount(expert_T[kept_T], minlength=num_experts)
    assert int(sent_N.max()) <= limit
    y_TD = dispatcher.combine(rows_RD, plan)
    torch.testing.assert_close(y_TD[kept_T], x_TD[kept_T], **EXACT)
    assert not y_TD[~kept_T].any()
    y_TD.sum().backward()
    assert x_TD.grad[~kept_T].abs().sum() == 0 and (x_TD.grad[kept_T] == 1).all()


def check_overlapped_dispatch(mesh: ExpertMesh, rank: int, capacity_factor: float | None) -> None:
    """Three chunks, exchanged while the experts run on earlier ones: the same rows meet the same experts, so the
    results, per-row outputs, kept tokens and gradients equal the plain dispatcher's."""
    num_experts = 8
    _, experts = rank_routing(rank, num_experts)
    expert_T = torch.tensor(experts, dtype=torch.long)
    scores_T = torch.rand(len(experts), generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    weight_TD = torch.randn(len(experts), 6, generator=torch.Generator().manual_seed(50 + rank), dtype=torch.float64)
    results = {}
    for name, dispatcher in [
        ("plain", AllToAllDispatcher(num_experts, mesh.ep_group, capacity_factor)),
        ("overlapped", OverlappedAllToAllDispatcher(num_experts, mesh.ep_group, 3, capacity_factor)),
    ]:
        first = dispatcher.first_local_expert

        def expert_fn(rows_RD, groups):
            scale_R1 = (groups.expert_R + first + 1)[:, None].to(rows_RD.dtype)  # depends on the global expert
            return rows_RD * scale_R1, (rows_RD[:, :3].detach(), groups.expert_R + first)

        x_TD = labelled_tokens(rank, experts).requires_grad_()
        run = dispatcher.run(x_TD, expert_T, scores_T, expert_fn)
        (run.combined_T * weight_TD).sum().backward()
        labels_T3 = dispatcher.combine(run.per_row[0], run.plan)
        experts_T = dispatcher.combine(run.per_row[1], run.plan)
        results[name] = (run.combined_T.detach(), x_TD.grad, labels_T3, experts_T, run.plan.kept_T)
    kept_T = results["plain"][4]
    kept_T = torch.ones(len(experts), dtype=torch.bool) if kept_T is None else kept_T
    scale_T1 = (expert_T + 1)[:, None].double() * kept_T[:, None]
    x_TD = labelled_tokens(rank, experts)
    torch.testing.assert_close(results["plain"][0], x_TD * scale_T1, **EXACT)
    torch.testing.assert_close(results["plain"][2], x_TD[:, :3] * kept_T[:, None], **EXACT)
    assert torch.equal(results["plain"][3], expert_T * kept_T)
    for plain, overlapped in zip(results["plain"], results["overlapped"]):
        assert (plain is None) == (overlapped is None)
        if plain is not None:
            torch.testing.assert_close(overlapped, plain, **EXACT)


# --- the model: forward and every gradient equal the single-device model ---------------------------------------
def top_e_model(experts_per_token: int, union_topk: bool = False, dispatcher=None, options: dict | None = None):
    """A `routed_model` (M = 64, N = 4, k = 3, AuxK on) whose router is softer under top-e routing, so that every
    chosen expert's gate matters (and, under union TopK, later experts win some of a token's k); `options`: more
    SAEConfig fields (a transcoder's, the expert compute's)."""
    cfg = SAEConfig(kind="switch", num_latents=64, num_experts=4, k=3, auxk_alpha=0.5, auxk_k=5, lb_alpha=3.0,
                    experts_per_token=experts_per_token, union_topk=union_topk, **(options or {}))
    full = routed_model(cfg, dispatcher)
    if experts_per_token > 1:
        with torch.no_grad():
            full.router.weight.mul_(0.015 if union_topk else 0.05)
    return full


def check_model_equivalence(
    ctx: ExpertParallelContext, rank: int, world: int, experts_per_token: int = 1, union_topk: bool = False,
    options: dict | None = None,
) -> None:
    """`options` (SAEConfig fields): e.g. a transcoder, whose target y stays on its token's rank while x travels;
    then the single-device model is checked against the dense oracle too."""
    full = top_e_model(experts_per_token, union_topk, options=options)
    cfg = full.cfg
    ep = routed_model(cfg, ctx.dispatcher(cfg.num_experts))
    load_shard(ep, full)
    x_TD = routed_batch(ROUTED_EXPERTS)
    tokens = x_TD.shape[0] // world
    mine = slice(rank * tokens, (rank + 1) * tokens)
    dead_L = torch.rand(cfg.num_latents, generator=torch.Generator().manual_seed(5)) < 0.5
    dispatcher = ep.dispatcher

    y_TD = transcoder_target(x_TD, cfg.d_out) if cfg.d_out else x_TD
    ref = full(x_TD, dead_candidates(dead_L, full.num_local_experts))
    out = ep(x_TD[mine], dead_candidates(local_latents(dead_L, dispatcher), ep.num_local_experts))
    if cfg.d_out:
        oracle_x_hat, _, oracle_terms = naive_forward(full, x_TD, dead_L, y_TD=y_TD)
        torch.testing.assert_close(ref.x_hat_TD, oracle_x_hat, **MODEL)
        for name, term in full.loss_terms(y_TD, ref).items():
            torch.testing.assert_close(term, oracle_terms[name], **MODEL)
    assert torch.bincount(ref.routing.expert_T, minlength=4).tolist() == [9, 6, 0, 17]
    if experts_per_token > 1:
        assert ref.routing.gate_TE[:, 1].min() > 0.05, "expected second experts that matter"
    torch.testing.assert_close(out.x_hat_TD, ref.x_hat_TD[mine], **MODEL)
    torch.testing.assert_close(out.aux_recon_TD, ref.aux_recon_TD[mine], **MODEL)
    fired_L = ctx.merge_fired(ep.fired_latents(out))
    assert torch.equal(fired_L, local_latents(full.fired_latents(ref), dispatcher))

    # Loss terms: the mean of the rank values is the single-device value over the global batch.
    weights = full.loss_weights(0.0)
    ref_terms = full.loss_terms(y_TD, ref)
    terms = ep.loss_terms(y_TD[mine], out, ctx)
    for name in ("rec", "lb", "auxk"):
        torch.testing.assert_close(ctx.all_reduce_sum(terms[name]) / world, ref_terms[name].detach(), **MODEL)

    # The load-balancing loss alone, then the full objective: every gradient after sync.
    def grads_match(ref_loss, loss):
        full.zero_grad(), ep.zero_grad()
        ref_loss.backward(retain_graph=True)
        loss.backward(retain_graph=True)
        ctx.sync_gradients(ep)
        ref_params = dict(full.named_parameters())
        for name, param in ep.named_parameters():
            ref_grad = ref_params[name].grad
            expected = torch.zeros_like(param) if ref_grad is None else shard_of(name, ref_grad, dispatcher)
            torch.testing.assert_close(param.grad, expected, **MODEL, msg=lambda m: f"{name}: {m}")

    grads_match(ref_terms["lb"], terms["lb"])
    assert full.router.weight.grad.abs().sum() > 0
    grads_match(total_loss(ref_terms, weights), total_loss(terms, weights))

    # The true global norm, which clipping divides by.
    ref_norm = torch.nn.utils.clip_grad_norm_(full.parameters(), float("inf"))
    torch.testing.assert_close(ctx.grad_norm(ep), ref_norm, **MODEL)

    # encode: global latent ids and gated values in token order.
    latents, ref_latents = ep.encode(x_TD[mine]), full.encode(x_TD)
    assert torch.equal(latents.indices_TK, ref_latents.indices_TK[mine])
    torch.testing.assert_close(latents.values_TK, ref_latents.values_TK[mine], **MODEL)
    if cfg.d_out:  # decode() on one device: the ids are global, the skip needs x
        torch.testing.assert_close(full.decode(latents, x_TD[mine]), ref.x_hat_TD[mine], **MODEL)
    if union_topk:  # k latents per token, some from a later expert (on another rank, for most tokens)
        later_TK = (ref_latents.indices_TK // 16 != ref.routing.expert_T[:, None]) & (ref_latents.values_TK > 0)
        assert latents.indices_TK.shape[1] == cfg.k and later_TK.any()


def check_union_capacity(ctx: ExpertParallelContext, rank: int, world: int) -> None:
    """Union TopK with capacity drops (cf = 1): a dropped row takes no part in its token's union, so the forward,
    encode and fired latents equal the oracle's with those rows left out of E(x)."""
    full = top_e_model(2, union_topk=True)
    ep = top_e_model(2, union_topk=True, dispatcher=ctx.dispatcher(4))
    load_shard(ep, full)
    x_TD = routed_batch(ROUTED_EXPERTS)
    tokens = x_TD.shape[0] // world
    x_mine = x_TD[rank * tokens : (rank + 1) * tokens]
    out = ep(x_mine)
    kept_TE = out.kept_T.view(-1, 2)
    one_of_two = ctx.all_reduce_sum((kept_TE[:, 0] ^ kept_TE[:, 1]).sum())
    assert one_of_two > 0, "expected tokens with one row dropped and one kept"
    ref_x_hat, ref_f_TL, _ = naive_forward(full, x_mine, kept_TE=kept_TE)
    torch.testing.assert_close(out.x_hat_TD, ref_x_hat, **MODEL)
    latents = ep.encode(x_mine)
    dense_f = torch.zeros_like(ref_f_TL).scatter_add(1, latents.indices_TK, latents.values_TK)
    torch.testing.assert_close(dense_f, ref_f_TL, **MODEL)
    fired_L = ctx.merge_fired(ep.fired_latents(out))
    all_fired_L = ctx.all_reduce_sum((ref_f_TL > 0).any(0).to(torch.int32)) > 0
    assert torch.equal(fired_L, local_latents(all_fired_L, ep.dispatcher))


def check_model_capacity(ctx: ExpertParallelContext, rank: int, world: int) -> None:
    """Dropped tokens reconstruct as b_pre; kept ones as on one device; the logged drop fractions are exact."""
    run = tiny_run("unused", capacity_factor=1.0)
    run.sae.num_latents, run.sae.k, run.data.d_model = 64, 3, 12
    run.trainer.batch_size = len(ROUTED_EXPERTS)
    trainer = Trainer(run, GlobalBatchSource(run, rank, world), ctx)
    full = routed_model(run.sae, seed=run.trainer.seed)
    load_shard(trainer.model, full)
    x_TD = routed_batch(ROUTED_EXPERTS).float()
    tokens = x_TD.shape[0] // world
    mine = slice(rank * tokens, (rank + 1) * tokens)
    with torch.no_grad():
        out = trainer.model(x_TD[mine])
        ref = full.float()(x_TD)
    limit = capacity(1.0, tokens, 4)
    kept_T = out.kept_T
    local_experts = torch.tensor(ROUTED_EXPERTS[mine])
    # All of a rank's tokens routed to one expert have (nearly) the same score, so count, do not pick.
    for expert in range(4):
        routed = int((local_experts == expert).sum())
        assert int(kept_T[local_experts == expert].sum()) == min(routed, limit)
    b_pre = trainer.model.b_pre.detach().float()
    torch.testing.assert_close(out.x_hat_TD[~kept_T], b_pre.expand(int((~kept_T).sum()), -1), **EXACT)
    torch.testing.assert_close(out.x_hat_TD[kept_T], ref.x_hat_TD[mine][kept_T], rtol=1e-5, atol=1e-5)

    result = trainer.train_step(x_TD[mine])
    row = trainer.step_metrics(x_TD[mine], result)
    routed_N = torch.zeros(4, dtype=torch.float64)
    dropped_N = torch.zeros(4, dtype=torch.float64)
    for source in range(world):
        experts = torch.tensor(ROUTED_EXPERTS[source * tokens : (source + 1) * tokens])
        counts = torch.bincount(experts, minlength=4).double()
        routed_N += counts
        dropped_N += (counts - limit).clamp_min(0)
    assert row["drop_fraction"] == pytest.approx(float(dropped_N.sum() / routed_N.sum()), abs=1e-12)
    assert row["drop_fraction_per_expert"] == pytest.approx((dropped_N / routed_N.clamp_min(1)).tolist(), abs=1e-12)
    assert row["drop_fraction"] > 0.3


# --- training: the Trainer on W ranks equals the single-device Trainer over the concatenated batch ---------------
def train_ep(run, rank: int, world: int) -> Trainer:
    parallel = run.parallel
    ctx = ExpertParallelContext(build_mesh("cpu", parallel.ep_size), parallel.capacity_factor, parallel.a2a_chunks)
    trainer = Trainer(run, GlobalBatchSource(run, rank, world), ctx)
    trainer.train()
    return trainer


def assert_matches_full(trainer: Trainer, full_state: dict, dead_L: torch.Tensor, tol: dict) -> None:
    dispatcher = getattr(trainer.model, "dispatcher", None)  # the ReLU SAE has none: nothing is sharded
    for name, tensor in trainer.model.state_dict().items():
        expected = shard_of(name, full_state[name], dispatcher) if dispatcher else full_state[name]
        torch.testing.assert_close(tensor, expected, **tol, msg=lambda m: f"{name}: {m}")
    expected_dead_L = local_latents(dead_L, dispatcher, trainer.run.sae.num_experts) if dispatcher else dead_L
    assert torch.equal(trainer.dead.tokens_since_fired_L, expected_dead_L)


RECIPE = {"sae.dead_count": "routed", "sae.dead_tokens": 32, "sae.auxk_alpha": 1 / 32, "trainer.lr_rule": "expert",
          "trainer.lr": None}
"""The recipe options of a Switch SAE that involve the ranks: dead counts from the global routed tokens, AuxK."""


UNION = {"sae.experts_per_token": 2, "sae.union_topk": True}
"""Top-2 routing with one TopK over the union of a token's two experts."""


def with_options(run, options: dict):
    for key, value in options.items():
        section, name = key.split(".")
        setattr(getattr(run, section), name, value)
    return run


KEEP_ALIVE = {**RECIPE, "sae.auxk_scale": "gao", "sae.resample_every": 2}
"""AuxK scaled as Gao et al. (the variances of x and of the residual over the global batch) and dead-latent
resampling after steps 2 and 4 (latents die after 2 steps): each rank gathers the global batch and draws per expert
what one device draws."""


def check_training(
    folder: Path, rank: int, world: int, ep_size: int, kind: str = "switch", a2a_chunks: int = 1,
    options: dict | None = None,
) -> tuple[Trainer, Trainer]:
    """With kind 'topk' or 'relu' (ep_size 1) this is plain data parallelism; `options` ('section.name': value)
    apply to both runs. Returns (this rank's trainer, the single-device trainer)."""
    tag = "".join(f"_{key.split('.')[1]}={value}" for key, value in sorted((options or {}).items()))
    name = f"{kind}_P{ep_size}_c{a2a_chunks}{tag}"
    run = tiny_run(folder / f"train_{name}", ep_size=ep_size, kind=kind)
    run.parallel.a2a_chunks = a2a_chunks
    trainer = train_ep(with_options(run, options or {}), rank, world)
    single_run = with_options(tiny_run(folder / f"single_{name}_rank{rank}", kind=kind), options or {})
    single = Trainer(single_run, GlobalBatchSource(single_run))
    single.train()
    assert_matches_full(trainer, single.model.state_dict(), single.dead.tokens_since_fired_L, TRAINING)
    return trainer, single


def check_keep_alive(folder: Path, rank: int, world: int, ep_size: int) -> None:
    """Training with KEEP_ALIVE equals one device's, with the same (global) count of resampled latents."""
    trainer, single = check_training(folder, rank, world, ep_size, options=KEEP_ALIVE)
    assert single.resampled > 0 and trainer.resampled == single.resampled


def check_batchtopk_replicas(folder: Path, rank: int, world: int) -> None:
    """Two replicas of every BatchTopK expert (P = 1) select over their own tokens but hold one threshold."""
    trainer = train_ep(tiny_run(folder / "batchtopk_P1", ep_size=1, kind="batchtopk"), rank, world)
    theta_N = trainer.model.experts.threshold_N
    thetas = [torch.empty_like(theta_N) for _ in range(world)]
    dist.all_gather(thetas, theta_N)
    assert (theta_N > 0).all() and all(torch.equal(t, theta_N) for t in thetas)


NORMALISED = {"data.normalize_activations": "expected_average_only_in"}


def check_normalised(folder: Path, rank: int, world: int, options: dict) -> None:
    """Activation normalisation estimated over the ranks' batches (an all-reduce of the norms' sums) gives every rank
    the factors one device estimates from the global batches, then training equal to one device's."""
    trainer, single = check_training(folder, rank, world, 2, options={**options, **NORMALISED})
    state, single_state = trainer.state, single.state
    assert state.input_scale is not None and state.input_scale != 1.0
    assert (state.target_scale is None) == ("sae.d_out" not in options)
    torch.testing.assert_close(state.input_scale, single_state.input_scale, rtol=1e-12, atol=0)
    if state.target_scale is not None:
        torch.testing.assert_close(state.target_scale, single_state.target_scale, rtol=1e-12, atol=0)
    scales = [None] * world
    dist.all_gather_object(scales, (state.input_scale, state.target_scale))
    assert all(s == scales[0] for s in scales)


TRANSCODER_MODELS = {
    "transcoder_skip_sparse": {"d_out": 7, "skip": True, "encoder_backward_kernel": "sparse",
                               "decoder_kernel": "gather"},
    "transcoder_gemm": {"d_out": 7, "skip": False, "encoder_backward_kernel": "gemm", "decoder_kernel": "gemm"},
}
"""Transcoders from d = 12 to 7 (docs/math.md section 9) on each expert compute, with and without the skip."""

TRANSCODER = {"sae.d_out": 20, "sae.skip": True}
"""A skip transcoder from the tiny run's d = 32 to 20."""


# --- checkpoints --------------------------------------------------------------------------------------------
def resume_dir(source_run: Path, step: int, target: Path, rank: int) -> None:
    """A run folder holding only checkpoint `step` of `source_run` (rank 0 copies, everyone waits)."""
    if rank == 0:
        copy_checkpoint(source_run, step, target)
    dist.barrier()


def assert_restored_exactly(trainer: Trainer, folder: Path) -> None:
    """Weights, Adam state and dead counters of a restored trainer equal the checkpoint's, bit for bit."""
    saved = ckpt.read_global_state(folder)
    dispatcher = trainer.model.dispatcher
    params = dict(trainer.model.named_parameters())
    for name, tensor in trainer.model.state_dict().items():
        torch.testing.assert_close(tensor, shard_of(name, saved[f"model.{name}"], dispatcher), **EXACT)
        for key, value in trainer.optimizer.state[params[name]].items():
            expected = saved[f"optim.{name}.{key}"]
            expected = shard_of(name, expected, dispatcher) if value.dim() else expected
            torch.testing.assert_close(value, expected, **EXACT)
    assert torch.equal(trainer.dead.tokens_since_fired_L, local_latents(saved["dead.tokens_since_fired"], dispatcher))


def check_resume(folder: Path, rank: int, world: int, ep_size: int, name: str, tol: dict) -> None:
    """Resume the 4-rank run's step-3 checkpoint on this layout; finish; compare with the unbroken run."""
    unbroken = folder / "ep_run"
    target = folder / name
    resume_dir(unbroken, 3, target, rank)
    run = tiny_run(target, ep_size=ep_size, resume=True)
    ctx = ExpertParallelContext(build_mesh("cpu", ep_size))
    trainer = Trainer(run, GlobalBatchSource(run, rank, world), ctx)
    assert trainer.maybe_resume() and trainer.step == 3
    assert_restored_exactly(trainer, target / "checkpoints" / checkpoint_name(3))
    trainer.train()
    assert_matches_checkpoint(trainer, unbroken / "checkpoints" / checkpoint_name(6), tol)


def assert_matches_checkpoint(trainer: Trainer, folder: Path, tol: dict) -> None:
    """The trainer's weights and dead counters equal (within `tol`) those saved in a checkpoint."""
    dead_L = ckpt.read_global_state(folder, "dead.")["tokens_since_fired"]
    assert_matches_full(trainer, ckpt.read_global_state(folder, "model."), dead_L, tol)


# --- the spawned jobs -------------------------------------------------------------------------------------------
def four_ranks(rank: int, world: int, folder: Path, check) -> None:
    for ep_size in (4, 2, 1):
        mesh = build_mesh("cpu", ep_size)
        with check(f"dispatch_identity_P{ep_size}"):
            check_dispatch_identity(mesh, rank)
        with check(f"dispatch_capacity_P{ep_size}"):
            check_dispatch_capacity(mesh, rank)
        for capacity_factor in (None, 1.0):
            with check(f"overlapped_dispatch_P{ep_size}_cf{capacity_factor}"):
                check_overlapped_dispatch(mesh, rank, capacity_factor)
        with check(f"model_P{ep_size}"):
            check_model_equivalence(ExpertParallelContext(mesh), rank, world)
        with check(f"model_overlapped_P{ep_size}"):
            check_model_equivalence(ExpertParallelContext(mesh, a2a_chunks=3), rank, world)
        with check(f"model_P{ep_size}_union"):
            check_model_equivalence(ExpertParallelContext(mesh), rank, world, experts_per_token=2, union_topk=True)
        for label, options in TRANSCODER_MODELS.items():
            with check(f"model_P{ep_size}_{label}"):
                check_model_equivalence(ExpertParallelContext(mesh), rank, world, options=options)
    with check("model_overlapped_P2_transcoder"):
        ctx = ExpertParallelContext(build_mesh("cpu", 2), a2a_chunks=3)
        check_model_equivalence(ctx, rank, world, options=TRANSCODER_MODELS["transcoder_skip_sparse"])
    with check("model_P4_transcoder_e2"):
        ctx = ExpertParallelContext(build_mesh("cpu", 4))
        check_model_equivalence(ctx, rank, world, experts_per_token=2, options=TRANSCODER_MODELS["transcoder_gemm"])
    with check("model_capacity"):
        check_model_capacity(ExpertParallelContext(build_mesh("cpu", 4), capacity_factor=1.0), rank, world)
    with check("model_capacity_union"):
        check_union_capacity(ExpertParallelContext(build_mesh("cpu", 4), capacity_factor=1.0), rank, world)
    for ep_size in (4, 2, 1):
        with check(f"training_P{ep_size}"):
            check_training(folder, rank, world, ep_size)
    with check("training_overlapped_P2"):
        check_training(folder, rank, world, 2, a2a_chunks=2)
    with check("training_keep_alive_P2"):
        check_keep_alive(folder, rank, world, 2)
    with check("training_P2_union"):
        check_training(folder, rank, world, 2, options=UNION)
    with check("training_keep_alive_P2_transcoder"):
        trainer, single = check_training(folder, rank, world, 2, options={**KEEP_ALIVE, **TRANSCODER})
        assert single.resampled > 0 and trainer.resampled == single.resampled
    with check("training_P4_transcoder_gemm"):
        check_training(folder, rank, world, 4, options={"sae.d_out": 20, "sae.encoder_backward_kernel": "gemm",
                                                        "sae.decoder_kernel": "gemm"})
    with check("checkpoint_save"):
        train_ep(tiny_run(folder / "ep_run", ep_size=2), rank, world)
    with check("resume_same_layout"):
        check_resume(folder, rank, world, 2, "resume_4", EXACT)


def two_ranks(rank: int, world: int, folder: Path, check) -> None:
    mesh = build_mesh("cpu", 2)
    with check("dispatch_identity_P2"):
        check_dispatch_identity(mesh, rank)
    with check("model_P2"):
        check_model_equivalence(ExpertParallelContext(mesh), rank, world)
    with check("training_P2"):
        check_training(folder, rank, world, 2)
    with check("training_recipe_P2"):
        check_training(folder, rank, world, 2, options=RECIPE)
    with check("training_keep_alive_P2"):
        check_keep_alive(folder, rank, world, 2)
    for kind in ("topk", "relu"):
        with check(f"data_parallel_{kind}"):
            check_training(folder, rank, world, 1, kind)
    with check("training_batchtopk_P2"):
        check_training(folder, rank, world, 2, "batchtopk")
    with check("model_P2_e2"):
        check_model_equivalence(ExpertParallelContext(mesh), rank, world, experts_per_token=2)
    with check("model_overlapped_P2_e2"):
        check_model_equivalence(ExpertParallelContext(mesh, a2a_chunks=3), rank, world, experts_per_token=2)
    with check("training_P2_e2"):
        check_training(folder, rank, world, 2, options={"sae.experts_per_token": 2})
    with check("model_P2_union"):
        check_model_equivalence(ExpertParallelContext(mesh), rank, world, experts_per_token=2, union_topk=True)
    with check("training_P2_union"):
        check_training(folder, rank, world, 2, options=UNION)
    with check("batchtopk_replicas_P1"):
        check_batchtopk_replicas(folder, rank, world)
    with check("training_P2_transcoder"):
        check_training(folder, rank, world, 2, options=TRANSCODER)
    for label, options in (("sae", {}), ("transcoder", TRANSCODER)):
        with check(f"training_P2_normalised_{label}"):
            check_normalised(folder, rank, world, options)
    for skip in (True, False):
        options = {**TRANSCODER, "sae.skip": skip}
        with check(f"training_batchtopk_P2_transcoder_skip={skip}"):
            check_training(folder, rank, world, 2, "batchtopk", options=options)
        for kind in ("topk", "relu"):
            with check(f"data_parallel_{kind}_transcoder_skip={skip}"):
                check_training(folder, rank, world, 1, kind, options=options)
    with check("model_P2_transcoder_skip_sparse"):
        check_model_equivalence(ExpertParallelContext(mesh), rank, world,
                                options=TRANSCODER_MODELS["transcoder_skip_sparse"])
    for ep_size in (2, 1):
        with check(f"resume_from_4_P{ep_size}"):
            check_resume(folder, rank, world, ep_size, f"resume_2_P{ep_size}", TRAINING)
