import math

import pytest
import torch

from sae_dist.config import SAEConfig
from sae_dist.models.base import default_lr
from sae_dist.train.init import geometric_median
from sae_dist.train.optim import clipped_adam_step, lr_multiplier
from sae_dist.train.optim import TorchAdam, normalize_rows_, project_rows_


def test_normalize_rows_to_unit_norm():
    w = torch.randn(3, 5, 7) * 4
    direction = w / w.norm(dim=-1, keepdim=True)
    normalize_rows_(w)
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(3, 5))
    torch.testing.assert_close(w, direction)


def test_projection_leaves_the_orthogonal_part():
    w = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(6, 4), dim=-1))
    orthogonal = torch.randn(6, 4)
    orthogonal -= (orthogonal * w).sum(-1, keepdim=True) * w
    w.grad = orthogonal + 2.5 * w.detach()
    project_rows_(w.detach(), w.grad)
    torch.testing.assert_close(w.grad, orthogonal, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((w.grad * w).sum(-1), torch.zeros(6), rtol=0, atol=1e-6)


def test_normalize_and_project_a_decoder_of_many_rows():
    w = torch.nn.Parameter(torch.randn(3000, 4, generator=torch.Generator().manual_seed(0)) * 3)
    direction = w.detach() / w.detach().norm(dim=-1, keepdim=True)
    normalize_rows_(w)
    torch.testing.assert_close(w.detach(), direction)
    w.grad = torch.randn(3000, 4)
    expected = w.grad - (w.grad * direction).sum(-1, keepdim=True) * direction
    project_rows_(w.detach(), w.grad)
    torch.testing.assert_close(w.grad, expected, rtol=1e-5, atol=1e-6)


def test_normalize_rows_leaves_rows_alone_after_a_skipped_step():
    w = torch.randn(3, 5, 7) * 4
    before = w.clone()
    normalize_rows_(w, apply=torch.tensor(False))
    assert torch.equal(w, before)
    normalize_rows_(w, apply=torch.tensor(True))
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(3, 5))


def test_clipped_fused_adam_equals_clip_then_adam_and_skips_when_told():
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(20, 8, generator=g)) for _ in range(2)]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = torch.optim.Adam(params, lr=0.01, fused=True)
    plain = torch.optim.Adam(reference, lr=0.01, foreach=False)
    for step, scale in enumerate([10.0, 0.01, 3.0]):  # clipped, not clipped, clipped
        grads = [scale * torch.randn(20, 8, generator=g) for _ in params]
        for p, r, grad in zip(params, reference, grads):
            p.grad, r.grad = grad.clone(), grad.clone()
        norm = torch.linalg.vector_norm(torch.stack([grad.norm() for grad in grads]))
        torch.nn.utils.clip_grad_norm_(reference, 1.0)
        clipped_adam_step(fused, norm, 1.0, torch.tensor(True))
        plain.step()
        for p, r in zip(params, reference):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6, msg=f"step {step}")
    before = [p.detach().clone() for p in params]
    moments = [fused.state[p]["exp_avg"].clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    clipped_adam_step(fused, torch.tensor(float("nan")), 1.0, torch.tensor(False))
    for p, b, m in zip(params, before, moments):
        assert torch.equal(p.detach(), b) and torch.equal(fused.state[p]["exp_avg"], m)
        assert float(fused.state[p]["step"]) == 3


def test_lr_schedule_constant_then_linear_decay():
    total, frac = 100, 0.2
    assert [lr_multiplier(s, total, frac) for s in (0, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_multiplier(80, total, frac) == 1.0
    assert lr_multiplier(90, total, frac) == pytest.approx(0.5)
    assert lr_multiplier(99, total, frac) == pytest.approx(0.05)
    assert lr_multiplier(100, total, frac) == 0.0
    assert lr_multiplier(10, total, 0.0) == 1.0


def test_default_lr_rule():
    assert default_lr(SAEConfig(num_latents=2**14)) == pytest.approx(2e-4)
    assert default_lr(SAEConfig(num_latents=2**16)) == pytest.approx(2e-4 / 2)
    assert default_lr(SAEConfig(kind="relu", num_experts=1)) == 5e-5


def test_geometric_median_is_robust_and_minimises_distance_sum():
    g = torch.Generator().manual_seed(0)
    inliers = torch.randn(200, 3, generator=g) + torch.tensor([1.0, -2.0, 3.0])
    outliers = torch.full((40, 3), 1000.0)
    x = torch.cat([inliers, outliers])
    median = geometric_median(x)
    assert (median - torch.tensor([1.0, -2.0, 3.0])).norm() < 0.5  # the mean is dragged ~170 away
    assert (x.mean(0) - median).norm() > 100

    def cost(point):
        return (x.double() - point.double()).norm(dim=1).sum()

    for _ in range(20):
        assert cost(median) <= cost(median + 0.05 * torch.randn(3, generator=g)) + 1e-6


def test_geometric_median_of_collinear_symmetric_points_is_centre():
    x = torch.tensor([[-1.0, 0.0], [0.0, 0.0], [5.0, 0.0]])
    assert math.isclose(float(geometric_median(x)[0]), 0.0, abs_tol=1e-3)


def test_bf16_state_adam_is_adam_with_moments_rounded_to_bf16():
    """Against the textbook update with the stored moments rounded to bfloat16 after each step; close to exact
    Adam; clipping through grad_scale and skipping through found_inf as the fused optimizer does."""
    g = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(3000, generator=g))
    exact = torch.nn.Parameter(param.detach().clone())
    ours = TorchAdam([param], lr=0.01, betas=(0.9, 0.999), eps=1e-8, state_dtype=torch.bfloat16)
    adam = torch.optim.Adam([exact], lr=0.01, foreach=False)
    p_ref, m, v = param.detach().clone(), torch.zeros(3000, dtype=torch.bfloat16), torch.zeros(3000, dtype=torch.bfloat16)
    for step, (scale, skip) in enumerate([(1.0, False), (2.5, False), (1.0, True), (1.0, False)]):
        grad = torch.randn(3000, generator=g)
        param.grad, exact.grad = grad.clone(), grad / scale
        ours.grad_scale, ours.found_inf = torch.tensor(scale), torch.tensor(float(skip))
        ours.step()
        if skip:
            continue
        adam.step()
        t = int(ours.state[param]["step"])
        clipped = grad / scale
        m_new = 0.9 * m.float() + 0.1 * clipped
        v_new = 0.999 * v.float() + 0.001 * clipped**2
        p_ref = p_ref - 0.01 / (1 - 0.9**t) * m_new / (v_new.sqrt() / (1 - 0.999**t) ** 0.5 + 1e-8)
        m, v = m_new.bfloat16(), v_new.bfloat16()
        torch.testing.assert_close(param.detach(), p_ref, rtol=1e-6, atol=1e-6, msg=f"step {step}")
        assert torch.equal(ours.state[param]["exp_avg"], m) and torch.equal(ours.state[param]["exp_avg_sq"], v)
        torch.testing.assert_close(param.detach(), exact.detach(), rtol=0, atol=3e-4)
    assert float(ours.state[param]["step"]) == 3


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_keeps_unit_rows_and_skips_when_told(state_dtype):
    """Its step is the projection, the clipped update of the same optimizer without unit rows, then the
    renormalisation, bit for bit; a skipped step leaves rows, other parameters and state alone."""
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(3, 20, 8, generator=g), dim=-1))
    b = torch.nn.Parameter(torch.randn(8, generator=g))
    ref_w, ref_b = (torch.nn.Parameter(p.detach().clone()) for p in (w, b))
    ours = TorchAdam([w, b], lr=0.01, betas=(0.9, 0.999), eps=1e-8, state_dtype=state_dtype, unit_norm_rows=[w])
    plain = TorchAdam([ref_w, ref_b], lr=0.01, betas=(0.9, 0.999), eps=1e-8, state_dtype=state_dtype)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=g) + 2 * p.detach() for p in (w, b)]
        w.grad, b.grad = (grad.clone() for grad in grads)
        ref_w.grad, ref_b.grad = (grad.clone() for grad in grads)
        norm = torch.linalg.vector_norm(torch.stack([grad.norm() for grad in grads]))
        clipped_adam_step(ours, norm, 1.0, torch.tensor(True))
        project_rows_(ref_w.detach(), ref_w.grad)
        clipped_adam_step(plain, norm, 1.0, torch.tensor(True))
        normalize_rows_(ref_w.detach())
        assert torch.equal(w.detach(), ref_w.detach()) and torch.equal(b.detach(), ref_b.detach()), step
    torch.testing.assert_close(w.detach().norm(dim=-1), torch.ones(3, 20))
    before = [w.detach().clone(), b.detach().clone(), ours.state[w]["exp_avg"].clone()]
    w.grad, b.grad = torch.full_like(w, float("nan")), torch.full_like(b, float("nan"))
    clipped_adam_step(ours, torch.tensor(float("nan")), 1.0, torch.tensor(False))
    assert torch.equal(w.detach(), before[0]) and torch.equal(b.detach(), before[1])
    assert torch.equal(ours.state[w]["exp_avg"], before[2]) and float(ours.state[w]["step"]) == 3
