"""TritonAdam's kernels under Triton's interpreter (on the CPU) equal the straightforward update: torch's Adam
(`foreach=False`) on the clipped gradients, for unit-norm rows after the gradient projection and before the
renormalisation of the torch backend, and `optim.bf16_adam_update_`
for bfloat16 moments; over steps with a changing lr, clipped and unclipped, with a skipped one, on sizes that are no
multiple of the block. Its state dict is torch
Adam's, through the trainer's checkpoints too, and the trainer's steps with it equal those with torch's fused Adam.

Triton picks its interpreter when it is imported, so these run in a process of their own started with
TRITON_INTERPRET=1 (`test_triton_adam.py`), which leaves every other test the compiled kernels."""

import copy
import math
import os

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import LambdaLR

from sae_dist.data import build_activation_source
from sae_dist.train.init import init_biases_from_batch
from sae_dist.train.optim import build_scheduler
from sae_dist.train.optim import bf16_adam_update_ as bf16_reference_update_
from sae_dist.train.optim import normalize_rows_, project_rows_
from sae_dist.train.trainer import Trainer
from tests.train.test_step import BATCH, step_run

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run by test_triton_adam.py, with TRITON_INTERPRET=1", allow_module_level=True)
ta = pytest.importorskip("sae_dist.train.triton_adam")

BETAS, EPS, LR = (0.9, 0.99), 1e-8, 0.01

SCHEDULE = [(1.0, False), (3.7, False), (2.0, True), (1.0, False), (1.6, False)]
"""(clip factor, skipped) per step: unclipped and clipped updates and a skipped step (its gradients are NaN)."""


def lr_lambda(step: int) -> float:
    return 1 / (1 + step)


def set_grads(params, grads, skip: bool) -> None:
    for param, grad in zip(params, grads):
        param.grad = torch.full_like(grad, math.nan) if skip else grad.clone()


def clip_and_skip(optimizer, scale: float, skip: bool) -> None:
    """Gradients divided by `scale`; no update if `skip` (what `optim.clip_and_skip` sets)."""
    optimizer.grad_scale, optimizer.found_inf = torch.tensor(scale), torch.tensor(float(skip))


def assert_same_state(ours, params, reference_state, tol: dict) -> None:
    for i, param in enumerate(params):
        state, expected = ours.state[param], reference_state[i]
        assert state["step"].dtype == torch.float32 and float(state["step"]) == float(expected["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key].float(), expected[key].float(), **tol, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_flat_update_equals_torch_adam(tensor_lr):
    """Sizes across a block boundary, with masked tails, and of one element; a float lr or a tensor lr, which
    LambdaLR fills in place."""
    g = torch.Generator().manual_seed(0)
    shapes = [(ta.ELEMENTS_PER_PROGRAM + 904,), (37, 3), (1,)]
    params = [Parameter(torch.randn(shape, generator=g)) for shape in shapes]
    reference = [Parameter(p.detach().clone()) for p in params]
    ours = ta.TritonAdam(params, lr=torch.tensor(LR) if tensor_lr else LR, betas=BETAS, eps=EPS)
    adam = torch.optim.Adam(reference, lr=LR, betas=BETAS, eps=EPS, foreach=False)
    schedules = [LambdaLR(optimizer, lr_lambda) for optimizer in (ours, adam)]
    for step, (scale, skip) in enumerate(SCHEDULE):
        grads = [torch.randn(shape, generator=g) for shape in shapes]
        before = [p.detach().clone() for p in params]
        set_grads(params, grads, skip)
        clip_and_skip(ours, scale, skip)
        ours.step()
        if skip:
            assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
        else:
            set_grads(reference, [grad / scale for grad in grads], False)
            adam.step()
        for schedule in schedules:
            schedule.step()
        for p, r in zip(params, reference):
            torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7, msg=lambda m: f"step {step}: {m}")
        assert_same_state(ours, params, [adam.state[r] for r in reference], {"rtol": 1e-5, "atol": 1e-8})
    assert ours.param_groups[0]["lr"] == pytest.approx(LR * lr_lambda(len(SCHEDULE)))


def test_rows_wider_than_the_row_kernel_are_refused(monkeypatch):
    """A decoder of rows wider than one program holds trains on the torch backend (`optim.build_optimizer` asks
    `keeps_rows_of`); TritonAdam refuses it rather than keep it otherwise."""
    monkeypatch.setattr(ta, "MAX_ROW_WIDTH", 64)
    w = Parameter(torch.ones(3, 96))
    assert not ta.TritonAdam.keeps_rows_of([w]) and ta.TritonAdam.keeps_rows_of([Parameter(torch.ones(3, 64))])
    with pytest.raises(ValueError, match="at most 64 elements"):
        ta.TritonAdam([w], lr=LR, betas=BETAS, eps=EPS, unit_norm_rows=[w])


@pytest.mark.parametrize("shape", [(3, 50, 96), (70, 300)], ids=["NMD", "MD"])
def test_unit_rows_update_equals_projection_adam_renormalisation(shape):
    """[N, M_e, d] and [M, d] weights, d no power of two (masked columns) and rows no multiple of a program's."""
    g = torch.Generator().manual_seed(1)
    w = Parameter(torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=-1))
    reference = Parameter(w.detach().clone())
    ours = ta.TritonAdam([w], lr=LR, betas=BETAS, eps=EPS, unit_norm_rows=[w])
    adam = torch.optim.Adam([reference], lr=LR, betas=BETAS, eps=EPS, foreach=False)
    schedules = [LambdaLR(optimizer, lr_lambda) for optimizer in (ours, adam)]
    for step, (scale, skip) in enumerate(SCHEDULE):
        grad = torch.randn(shape, generator=g) + 3 * w.detach()  # a large component along the rows
        before = w.detach().clone()
        set_grads([w], [grad], skip)
        clip_and_skip(ours, scale, skip)
        ours.step()
        if skip:
            assert torch.equal(w.detach(), before)
        else:
            reference.grad = grad.clone()
            project_rows_(reference.detach(), reference.grad)
            reference.grad /= scale
            adam.step()
            normalize_rows_(reference.detach())
        for schedule in schedules:
            schedule.step()
        torch.testing.assert_close(w.detach(), reference.detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"step {step}: {m}")
        torch.testing.assert_close(w.detach().norm(dim=-1), torch.ones(shape[:-1]), rtol=0, atol=1e-6)
        assert_same_state(ours, [w], [adam.state[reference]], {"rtol": 1e-5, "atol": 1e-7})


@pytest.mark.parametrize("unit_rows", [False, True])
def test_bf16_moments_equal_the_bf16_state_update(unit_rows):
    """Against `optim.bf16_adam_update_` (after the projection and before the renormalisation for unit
    rows): the same moments, rounded to the same bfloat16 values, and the same parameters."""
    g = torch.Generator().manual_seed(2)
    shape = (90, 40)
    start = torch.randn(shape, generator=g)
    w = Parameter(torch.nn.functional.normalize(start, dim=-1) if unit_rows else start)
    ours = ta.TritonAdam([w], lr=LR, betas=BETAS, eps=EPS, state_dtype=torch.bfloat16,
                         unit_norm_rows=[w] if unit_rows else [])
    schedule = LambdaLR(ours, lr_lambda)
    reference = Parameter(w.detach().clone())
    m, v = (torch.zeros(shape, dtype=torch.bfloat16) for _ in range(2))
    step_count = torch.zeros(())
    for step, (scale, skip) in enumerate(SCHEDULE):
        grad = torch.randn(shape, generator=g)
        lr = torch.tensor(ours.param_groups[0]["lr"])
        set_grads([w], [grad], skip)
        clip_and_skip(ours, scale, skip)
        ours.step()
        schedule.step()
        if not skip:
            reference.grad = grad.clone()
            if unit_rows:
                project_rows_(reference.detach(), reference.grad)
            step_count += 1
            bf16_reference_update_(reference.detach(), reference.grad, m, v, step_count, lr, *BETAS, EPS,
                                   torch.tensor(scale), torch.tensor(False))
            if unit_rows:
                normalize_rows_(reference.detach())
        state = ours.state[w]
        assert state["exp_avg"].dtype == torch.bfloat16 and float(state["step"]) == float(step_count)
        # The projection's dot products are summed in another order than torch's: a moment may round to the
        # neighbouring bfloat16 (0.4%); a wrong update is off by far more.
        moment_tol = {"rtol": 1e-2, "atol": 1e-6} if unit_rows else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(state["exp_avg"], m, **moment_tol, msg=lambda msg: f"step {step}: {msg}")
        torch.testing.assert_close(state["exp_avg_sq"], v, **moment_tol, msg=lambda msg: f"step {step}: {msg}")
        torch.testing.assert_close(w.detach(), reference.detach(), rtol=1e-5, atol=1e-6)


def test_state_dict_loads_into_torch_adam_and_back():
    """TritonAdam's state dict continues in a fused torch Adam, and torch Adam's in TritonAdam (float32 step count
    on the parameters' device; bfloat16 moments where asked): the next updates equal."""
    g = torch.Generator().manual_seed(3)
    params = [Parameter(torch.randn(300, generator=g)), Parameter(torch.randn(20, 7, generator=g))]
    ours = ta.TritonAdam(params, lr=LR, betas=BETAS, eps=EPS)
    for _ in range(2):
        set_grads(params, [torch.randn(p.shape, generator=g) for p in params], False)
        ours.step()
    copies = [Parameter(p.detach().clone()) for p in params]
    adam = torch.optim.Adam(copies, lr=1.0, fused=True)
    adam.load_state_dict(copy.deepcopy(ours.state_dict()))  # as from a file: no tensor shared
    grads = [torch.randn(p.shape, generator=g) for p in params]
    for optimizer, ps in ((ours, params), (adam, copies)):
        set_grads(ps, grads, False)
        optimizer.step()
    for p, c in zip(params, copies):
        torch.testing.assert_close(c.detach(), p.detach(), rtol=1e-6, atol=1e-7)
    for state_dtype in (torch.float32, torch.bfloat16):
        again = [Parameter(c.detach().clone()) for c in copies]
        loaded = ta.TritonAdam(again, lr=LR, betas=BETAS, eps=EPS, state_dtype=state_dtype)
        loaded.load_state_dict(copy.deepcopy(adam.state_dict()))
        assert loaded.param_groups[0]["lr"] == LR and loaded.param_groups[0]["betas"] == BETAS
        for c, a in zip(copies, again):
            state = loaded.state[a]
            assert state["step"].dtype == torch.float32 and float(state["step"]) == 3
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == state_dtype
            torch.testing.assert_close(state["exp_avg"], adam.state[c]["exp_avg"].to(state_dtype))


def test_trainer_steps_and_checkpoints_equal_the_torch_adam_trainer(tmp_path):
    """The Switch trainer with TritonAdam (its decoder projected and renormalised inside the update, which the
    trainer then leaves alone) steps as the trainer with torch's fused Adam, AuxK and clipping included; each
    resumes from the other's checkpoint and the next steps still agree."""
    runs = {name: step_run(tmp_path / name, "switch") for name in ("torch", "triton")}
    source = build_activation_source(runs["torch"])
    batches = [source.next_batch(BATCH) for _ in range(5)]

    def trainer(name: str, triton: bool) -> Trainer:
        t = Trainer(runs[name], build_activation_source(runs[name]))
        if triton:
            cfg = runs[name].trainer
            t.engine.optimizer = ta.TritonAdam(t.model.parameters(), lr=cfg.lr, betas=cfg.adam_betas,
                                               eps=cfg.adam_eps, unit_norm_rows=t.model.decoder_weights())
            t.engine.scheduler = build_scheduler(t.optimizer, runs[name])
        init_biases_from_batch(t.model, batches[0])
        return t

    trainers = {"torch": trainer("torch", False), "triton": trainer("triton", True)}
    w_dec = trainers["triton"].model.experts.w_dec
    assert trainers["triton"].optimizer.unit_norm_rows == (w_dec,)

    def step_all(ts: list[Trainer], x_TD: torch.Tensor) -> None:
        for t in ts:
            assert bool(t.train_step(x_TD).finite)
        for t in ts[1:]:
            for (name, p), q in zip(ts[0].model.named_parameters(), t.model.parameters()):
                torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")

    for x_TD in batches[:3]:
        step_all(list(trainers.values()), x_TD)
    folders = {}
    for name, t in trainers.items():
        t.step = 3
        folders[name] = t.save()
    resumed = {"torch": trainer("torch", False), "triton": trainer("triton", True)}
    resumed["torch"].restore(folders["triton"])
    resumed["triton"].restore(folders["torch"])
    for name, saver in (("torch", "triton"), ("triton", "torch")):
        for p, q in zip(trainers[saver].model.parameters(), resumed[name].model.parameters()):
            saved, loaded = trainers[saver].optimizer.state[p], resumed[name].optimizer.state[q]
            assert loaded["step"].dtype == torch.float32 and float(loaded["step"]) == float(saved["step"]) == 3
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(loaded[key], saved[key]), key
    # Restored trainers restart AuxK's candidate bookkeeping, so they are compared with each other.
    for x_TD in batches[3:]:
        step_all(list(resumed.values()), x_TD)
