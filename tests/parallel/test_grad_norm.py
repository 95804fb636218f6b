"""The gradient norm that clipping uses, on a CPU: to float32 precision even over millions of elements, where a
whole-tensor float32 norm (one running sum of squares) drifts."""

import torch
from torch import nn

from sae_dist.parallel.context import ParallelContext, squared_norm


def large_tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4096, 2048, generator=g), torch.randn(2048, generator=g), torch.randn(3, 5, 7, generator=g),
            torch.tensor(2.0)]


def test_squared_norm_equals_float64_over_millions_of_elements():
    tensors = large_tensors()
    expected = sum(float(t.double().square().sum()) for t in tensors)
    got = squared_norm(tensors, torch.device("cpu"))
    assert got.dtype == torch.float32 and got.dim() == 0
    assert abs(float(got) - expected) / expected < 1e-6  # a whole-tensor float32 norm: 5e-4 here


def test_grad_norm_of_a_model():
    model = nn.ParameterList([nn.Parameter(torch.zeros_like(t)) for t in large_tensors()])
    for param, grad in zip(model, large_tensors()):
        param.grad = grad
    expected = sum(float(t.double().square().sum()) for t in large_tensors()) ** 0.5
    assert abs(float(ParallelContext().grad_norm(model)) - expected) / expected < 1e-6
