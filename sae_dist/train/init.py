"""Initialisation from data (docs/math.md sections 3 and 9): b_pre (b_in), b_router and a transcoder's b_out start at
the geometric median of a batch."""

from __future__ import annotations

import torch
from torch import Tensor

from sae_dist.models.base import SAE, TARGET_BIASES


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
def init_biases_from_batch(model: SAE, rows_TC: Tensor) -> None:
    """Set every bias in `model.bias_parameters()` to a geometric median of the source rows `rows_TC`: that of
    the targets y for b_out (`TARGET_BIASES`), that of the inputs x for the others (b_pre, b_in, b_router)."""
    x_TD, y_TO = model.split_batch(rows_TC)
    biases = model.bias_parameters()
    input_median = geometric_median(x_TD)
    target_median = geometric_median(y_TO) if TARGET_BIASES & biases.keys() else None
    for name, bias in biases.items():
        bias.copy_(target_median if name in TARGET_BIASES else input_median)
