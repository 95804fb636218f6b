"""On a CUDA GPU (skipped elsewhere): the trainer's step there (TritonAdam with the decoder's projection and
renormalisation in its update, grouped_mm, CUDA graphs) equals the straightforward step on the CPU and the step
with torch's fused Adam and separate passes; TritonAdam's step replays in a CUDA graph; the bf16 step runs without
reading the device back to the host; steps and training runs replayed from CUDA graphs equal eager ones;
the bfloat16-moment torch Adam on the GPU equals its CPU form; prefetch through a CUDA stream hands over the source's batches
unchanged."""

import copy
import json
import warnings

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from sae_dist.data import PrefetchingSource, build_activation_source
from sae_dist.train.latents import DeadLatentTracker
from sae_dist.train.init import init_biases_from_batch
from sae_dist.train.optim import TritonAdam, build_scheduler
from sae_dist.train.optim import TorchAdam
from sae_dist.train.trainer import Trainer
from tests.parallel.ep_helpers import copy_checkpoint
from tests.reference import reference_train_step
from tests.train.test_step import BATCH, assert_same_weights, step_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("formulation", [("sparse", "gather"), ("gemm", "gemm")])
@pytest.mark.parametrize("kind", ["switch", "topk"])
def test_cuda_trainer_steps_equal_cpu_reference_steps(tmp_path, kind, formulation):
    run = step_run(tmp_path, kind, formulation)
    run.trainer.device, run.trainer.dtype = "cuda", "float32"
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
        torch.testing.assert_close(result.loss.cpu(), ref_loss, rtol=1e-4, atol=1e-5)
        assert torch.equal(trainer.dead.tokens_since_fired_L.cpu(), ref_dead.tokens_since_fired_L)
        assert_same_weights(trainer.model, reference, {"rtol": 1e-3, "atol": 1e-5})


FORMULATIONS = [("switch", ("gemm", "gemm")), ("topk", ("sparse", "gather"))]


@pytest.mark.parametrize(("kind", "formulation"), FORMULATIONS)
def test_cuda_bf16_step_reads_nothing_back_to_the_host(tmp_path, kind, formulation):
    """Both formulations in bf16 autocast (the GEMM one through grouped_mm's fused path), AuxK over dead latents
    included, eagerly (no CUDA graphs, whose capture synchronises): after warm-up steps, a step issues no
    synchronising call (`torch.cuda.set_sync_debug_mode('warn')` warns at each one; all are listed on failure)."""
    run = step_run(tmp_path, kind, formulation)
    run.trainer.device, run.trainer.dtype, run.trainer.cuda_graph = "cuda", "bfloat16", False
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
    assert all(bool(r.finite) for r in results) and "auxk" in results[-1].terms


def _bf16_trainers(tmp_path, kind, formulation, **trainer_fields) -> dict[bool, Trainer]:
    """Two bf16 trainers of the same run on the GPU, keyed by whether they replay CUDA graphs."""
    trainers = {}
    for graphs in (False, True):
        run = step_run(tmp_path / f"graphs_{graphs}", kind, formulation)
        run.trainer.device, run.trainer.dtype, run.trainer.cuda_graph = "cuda", "bfloat16", graphs
        for name, value in trainer_fields.items():
            setattr(run.trainer, name, value)
        trainers[graphs] = Trainer(run, build_activation_source(run), device="cuda")
    assert trainers[True].stepper.graphs is not None and trainers[False].stepper.graphs is None
    return trainers


@pytest.mark.parametrize(("kind", "formulation"), FORMULATIONS)
def test_cuda_graph_steps_equal_eager_steps(tmp_path, kind, formulation):
    """Twelve bf16 steps from CUDA graphs equal eager ones: captured after warm-up, again for each new AuxK
    candidate width (AuxK runs from the third step), a NaN batch skipped (no update) in between. Compared: every
    step's loss, gradient norm and finite flag, then the weights, Adam's state and the dead-latent counters."""
    trainers = _bf16_trainers(tmp_path, kind, formulation, on_nonfinite="skip")
    source = build_activation_source(trainers[False].run)
    batches = [source.next_batch(BATCH).cuda() for _ in range(12)]
    batches[7] = batches[7].clone()
    batches[7][3, 5] = float("nan")
    for trainer in trainers.values():
        init_biases_from_batch(trainer.model, batches[0])
    for step, x_TD in enumerate(batches):
        eager, graphed = (trainers[g].train_step(x_TD) for g in (False, True))
        assert bool(graphed.finite) == bool(eager.finite) == (step != 7)
        for key in ("loss", "grad_norm"):
            torch.testing.assert_close(graphed[key], eager[key], rtol=1e-4, atol=1e-6, equal_nan=True,
                                       msg=lambda m, key=key, step=step: f"step {step} {key}: {m}")
    assert trainers[True].stepper.graphs.before is not None  # the last steps replayed a graph
    assert_same_weights(trainers[True].model, trainers[False].model, {"rtol": 1e-3, "atol": 1e-5})
    adam = {g: trainers[g].optimizer for g in trainers}
    for param_g, param_e in zip(trainers[True].model.parameters(), trainers[False].model.parameters(), strict=True):
        for key, value in adam[False].state[param_e].items():
            torch.testing.assert_close(adam[True].state[param_g][key], value, rtol=1e-3, atol=1e-6)
    assert torch.equal(trainers[True].dead.tokens_since_fired_L, trainers[False].dead.tokens_since_fired_L)


def test_cuda_graph_training_run_equals_eager_run_through_a_resume(tmp_path):
    """`Trainer.train` with CUDA graphs: its metrics rows (read from the graphs' outputs at logging steps) equal an
    eager run's; a run stopped at its step-6 checkpoint and resumed (graphs dropped, captured anew) logs the same
    rows again."""
    trainers = _bf16_trainers(tmp_path, "switch", ("gemm", "gemm"), steps=12, log_every=3, checkpoint_every=6)

    def rows(trainer: Trainer) -> list[dict]:
        lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    for trainer in trainers.values():
        trainer.train()
    eager, graphed = rows(trainers[False]), rows(trainers[True])
    assert [r["step"] for r in graphed] == [3, 6, 9, 12]
    for eager_row, graph_row in zip(eager, graphed, strict=True):
        for key in ("loss", "mse", "grad_norm", "dead"):
            assert graph_row[key] == pytest.approx(eager_row[key], rel=1e-3, abs=1e-6), (graph_row["step"], key)
    resumed_run = copy.deepcopy(trainers[True].run)
    resumed_run.trainer.out_dir = str(tmp_path / "resumed")
    copy_checkpoint(trainers[True].run_dir, 6, tmp_path / "resumed")
    resumed = Trainer(resumed_run, build_activation_source(resumed_run), device="cuda")
    resumed.train()
    for graph_row, resumed_row in zip(graphed[2:], rows(resumed), strict=True):
        assert resumed_row["loss"] == pytest.approx(graph_row["loss"], rel=1e-3), resumed_row["step"]


def test_cuda_step_that_cannot_be_captured_runs_eagerly(tmp_path, monkeypatch, capsys):
    """An operator that cannot be captured (here a read back to the host inside the step): one warning, then every
    step runs eagerly and equals the eager trainer's."""
    trainers = _bf16_trainers(tmp_path, "switch", ("gemm", "gemm"))
    graphed = trainers[True]
    plain_before_update = graphed.before_update

    def reads_back(*args):
        result = plain_before_update(*args)
        float(result.loss)  # a host synchronisation: forbidden while capturing
        return result

    monkeypatch.setattr(graphed, "before_update", reads_back)
    source = build_activation_source(graphed.run)
    batches = [source.next_batch(BATCH).cuda() for _ in range(6)]
    for trainer in trainers.values():
        init_biases_from_batch(trainer.model, batches[0])
    for x_TD in batches:
        eager, captured = (trainers[g].train_step(x_TD) for g in (False, True))
        torch.testing.assert_close(captured.loss, eager.loss, rtol=1e-4, atol=1e-6)
    assert graphed.stepper.graphs.failed and graphed.stepper.graphs.before is None
    printed = capsys.readouterr()
    assert (printed.out + printed.err).count("cannot be captured as a CUDA graph") == 1
    assert_same_weights(graphed.model, trainers[False].model, {"rtol": 1e-3, "atol": 1e-5})


def test_cuda_bf16_state_adam_equals_its_cpu_form():
    """The chunked update on the GPU against the same on the CPU, clip and skip included."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(5000, generator=g)
    params = {device: torch.nn.Parameter(start.clone().to(device)) for device in ("cpu", "cuda")}
    optimizers = {device: TorchAdam([p], lr=0.01, betas=(0.9, 0.999), eps=1e-8, state_dtype=torch.bfloat16)
                  for device, p in params.items()}
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


@pytest.mark.parametrize("state", ["float32", "bfloat16"])
def test_cuda_triton_adam_trainer_steps_equal_the_torch_optimizer_steps(tmp_path, state):
    """On a GPU the trainer's optimizer is TritonAdam (the decoder projected and renormalised in its update); its
    steps equal those of the trainer with the torch backend (torch's fused Adam or its bfloat16-moment update between the
    projection and renormalisation passes)."""
    run = step_run(tmp_path, "switch", ("gemm", "gemm"))
    run.trainer.device, run.trainer.optimizer_state, run.trainer.dtype = "cuda", state, "float32"
    source = build_activation_source(run)
    batches = [source.next_batch(BATCH).cuda() for _ in range(6)]
    trainers = [Trainer(run, build_activation_source(run), device="cuda") for _ in range(2)]
    assert isinstance(trainers[0].optimizer, TritonAdam)
    cfg = run.trainer
    engine = trainers[1].engine
    engine.optimizer = TorchAdam(trainers[1].model.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                 eps=cfg.adam_eps, state_dtype=getattr(torch, state),
                                 unit_norm_rows=trainers[1].model.decoder_weights())
    engine.scheduler = build_scheduler(engine.optimizer, run)
    # bf16 moments: a moment rounded to the neighbouring bfloat16 (fused arithmetic) moves a parameter by ~lr/250.
    tol = {"rtol": 1e-5, "atol": 1e-6} if state == "float32" else {"rtol": 0, "atol": 1e-4}
    for trainer in trainers:
        init_biases_from_batch(trainer.model, batches[0])
    for step, x_TD in enumerate(batches):
        for trainer in trainers:
            assert bool(trainer.train_step(x_TD).finite)
        for (name, ours), theirs in zip(trainers[0].model.named_parameters(), trainers[1].model.parameters()):
            torch.testing.assert_close(ours, theirs, **tol, msg=lambda m: f"step {step}, {name}: {m}")


def test_cuda_triton_adam_step_replays_in_a_cuda_graph():
    """TritonAdam's step captured in a CUDA graph, replayed with new gradients, clip factors, a skip and the lr that
    LambdaLR writes into the group's lr tensor, equals the same steps run eagerly, bit for bit."""
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(300, 96), (5000,)]
    start = [torch.nn.functional.normalize(torch.randn(shapes[0], device="cuda", generator=g), dim=-1),
             torch.randn(shapes[1], device="cuda", generator=g)]

    def build():
        params = [torch.nn.Parameter(w.clone()) for w in start]
        optimizer = TritonAdam(params, lr=torch.tensor(0.01, device="cuda"), betas=(0.9, 0.999), eps=1e-8,
                               unit_norm_rows=params[:1])
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.grad_scale, optimizer.found_inf = torch.ones((), device="cuda"), torch.zeros((), device="cuda")
        return params, optimizer, LambdaLR(optimizer, lambda step: 1 / (1 + step))

    (eager_params, eager, eager_lr), (graph_params, captured, graph_lr) = build(), build()
    for optimizer in (eager, captured):  # compiles the kernels and makes the state before the capture
        optimizer.step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        captured.step()
    torch.cuda.current_stream().wait_stream(stream)
    for scale, skip in [(1.0, False), (3.0, False), (2.0, True), (1.5, False)]:
        grads = [torch.randn(shape, device="cuda", generator=g) for shape in shapes]
        for optimizer, params in ((eager, eager_params), (captured, graph_params)):
            for p, grad in zip(params, grads):
                p.grad.copy_(grad)
            optimizer.grad_scale.fill_(scale)
            optimizer.found_inf.fill_(float(skip))
        eager.step()
        graph.replay()
        for schedule in (eager_lr, graph_lr):
            schedule.step()
        for ours, theirs in zip(graph_params, eager_params):
            assert torch.equal(ours, theirs)
            assert torch.equal(captured.state[ours]["exp_avg_sq"], eager.state[theirs]["exp_avg_sq"])
        assert float(captured.state[graph_params[1]]["step"]) == float(eager.state[eager_params[1]]["step"])
