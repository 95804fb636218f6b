"""On a CUDA GPU (skipped elsewhere): the trainer's step there (fused Adam, `torch.compile`d renormalisation and
projection, grouped_mm) equals the straightforward step on the CPU; the bf16 step runs without reading the device
back to the host; the compiled bf16-state Adam equals its eager CPU form; prefetch through a CUDA stream hands over
the source's batches unchanged."""

import copy
import warnings

import pytest
import torch

from sae_dist.data import PrefetchingSource, build_activation_source
from sae_dist.models.reference import reference_train_step
from sae_dist.train.dead import DeadLatentTracker
from sae_dist.train.init import init_biases_from_batch
from sae_dist.train.trainer import Trainer
from tests.train.test_step import BATCH, assert_same_weights, step_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("formulation", [("sparse", "gather"), ("gemm", "gemm")])
@pytest.mark.parametrize("kind", ["switch", "topk"])
def test_cuda_trainer_steps_equal_cpu_reference_steps(tmp_path, kind, formulation):
    run = step_run(tmp_path, kind, formulation)
    run.trainer.device = "cuda"
    trainer = Trainer(run, build_activation_source(run), device="cuda")
    source = build_activation_source(run)
    batches = [source.next_batch(BATCH).cpu() for _ in range(6)]
    init_biases_from_batch(trainer.model, batches[0].cuda())
    reference = copy.deepcopy(trainer.model).cpu()
    cfg = run.trainer
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                     foreach=False)
    ref_dead = DeadLatentTracker(reference.num_local_latents, run.sae.dead_tokens)
    for step, x_TD in enumerate(batches):
        result = trainer.train_step(x_TD.cuda())
        dead_mask_L = ref_dead.dead_mask() if step * BATCH >= run.sae.dead_tokens else None
        ref_loss, f_TL = reference_train_step(reference, ref_optimizer, x_TD, cfg.grad_clip, dead_mask_L)
        ref_dead.update((f_TL > 0).any(0), BATCH)
        torch.testing.assert_close(result["loss"].cpu(), ref_loss, rtol=1e-4, atol=1e-5)
        assert torch.equal(trainer.dead.tokens_since_fired_L.cpu(), ref_dead.tokens_since_fired_L)
        assert_same_weights(trainer.model, reference, {"rtol": 1e-3, "atol": 1e-5})


@pytest.mark.parametrize(("kind", "formulation"), [("switch", ("gemm", "gemm")), ("topk", ("sparse", "gather"))])
def test_cuda_bf16_step_reads_nothing_back_to_the_host(tmp_path, kind, formulation):
    """Both formulations in bf16 autocast (the GEMM one through grouped_mm's fused path), AuxK over dead latents
    included: after warm-up steps, a step issues no synchronising call (`torch.cuda.set_sync_debug_mode('warn')`
    warns at each one; all of them are listed on failure)."""
    run = step_run(tmp_path, kind, formulation)
    run.trainer.device, run.trainer.dtype = "cuda", "bfloat16"
    trainer = Trainer(run, build_activation_source(run), device="cuda")
    source = build_activation_source(run)
    batches = [source.next_batch(BATCH).cuda() for _ in range(6)]
    init_biases_from_batch(trainer.model, batches[0])
    for x_TD in batches[:4]:  # AuxK runs from the third step (latents die after 2), its candidates lag two steps
        trainer.train_step(x_TD)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            results = [trainer.train_step(x_TD) for x_TD in batches[4:]]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
             if "called a synchronizing CUDA operation" in str(w.message)]
    assert not syncs, "\n".join(syncs)
    assert all(bool(r["finite"]) for r in results) and "auxk" in results[-1]["terms"]


def test_cuda_bf16_state_adam_equals_its_cpu_form():
    """The compiled one-kernel update on the GPU against the eager chunked update on the CPU, clip and skip included."""
    from sae_dist.train.bf16_adam import BF16StateAdam

    g = torch.Generator().manual_seed(0)
    start = torch.randn(5000, generator=g)
    params = {device: torch.nn.Parameter(start.clone().to(device)) for device in ("cpu", "cuda")}
    optimizers = {device: BF16StateAdam([p], lr=0.01, betas=(0.9, 0.999), eps=1e-8) for device, p in params.items()}
    for scale, skip in [(1.0, False), (2.5, False), (1.0, True), (1.0, False)]:
        grad = torch.randn(5000, generator=g)
        for device, optimizer in optimizers.items():
            params[device].grad = grad.to(device)
            optimizer.grad_scale = torch.tensor(scale, device=device)
            optimizer.found_inf = torch.tensor(float(skip), device=device)
            optimizer.step()
        # A moment that rounds to the neighbouring bfloat16 (fused arithmetic) moves a parameter by ~lr/250;
        # a wrong update moves it by ~lr.
        torch.testing.assert_close(params["cuda"].detach().cpu(), params["cpu"].detach(), rtol=0, atol=1e-4)
        for key in ("exp_avg", "exp_avg_sq"):
            cuda_state, cpu_state = (optimizers[d].state[params[d]][key] for d in ("cuda", "cpu"))
            assert (cuda_state.cpu() == cpu_state).float().mean() > 0.99, key


def test_cuda_prefetch_hands_over_the_source_batches_unchanged(tmp_path):
    """Batches produced in the prefetch thread's own CUDA stream equal the source's own, in order, on the GPU
    (this source yields host rows)."""
    run = step_run(tmp_path, "switch")
    plain = build_activation_source(run)
    expected = [plain.next_batch(BATCH).cpu() for _ in range(6)]
    prefetched = PrefetchingSource(build_activation_source(run), depth=3, device="cuda")
    try:
        for batch in expected:
            got = prefetched.next_batch(BATCH)
            assert got.device.type == "cuda"
            torch.testing.assert_close(got.cpu(), batch, rtol=0, atol=0)
    finally:
        prefetched.close()
