"""Initialisation from data (SPEC section 3): b_pre and b_router start at the geometric median of a batch."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def geometric_median(x_TD: Tensor, max_iters: int = 100, tol: float = 1e-5) -> Tensor:
    """Weiszfeld iterations from the mean; stops when the point moves less than `tol` (relative) or at `max_iters`.

    Returns [d] in x's dtype; computed in float64 since activations can have norms in the thousands.
    """
    points = x_TD.double()
    median = points.mean(dim=0)
    for _ in range(max_iters):
        distances = (points - median).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / distances
        new_median = (weights[:, None] * points).sum(dim=0) / weights.sum()
        shift = (new_median - median).norm()
        median = new_median
        if shift <= tol * median.norm().clamp_min(1.0):
            break
    return median.to(x_TD.dtype)


@torch.no_grad()
def init_biases_from_batch(model: torch.nn.Module, x_TD: Tensor) -> None:
    """Set every bias in `model.bias_parameters()` (b_pre, b_router) to the geometric median of `x_TD`."""
    median = geometric_median(x_TD)
    for bias in model.bias_parameters().values():
        bias.copy_(median)
