"""Activation normalisation (data.normalize_activations='expected_average_only_in', SAELens's rule): the SAE trains
on s * x with s = sqrt(d) / E||x||_2, so that its inputs have mean L2 norm sqrt(d) whatever the scale of the site.

s is estimated once, before the first step, from the first `ESTIMATE_BATCHES` batches of every rank (drawn from the
stream, which the checkpoints' data positions then include); the sums are reduced over the ranks, so every rank
holds the same s. The checkpoints save it (`TrainState`), a continued run restores it, and `load_sae` folds it into
the weights (`SAE.fold_input_scale_`, docs/math.md).
"""

from __future__ import annotations

import math

import torch

from sae_dist.data.source import ActivationSource
from sae_dist.parallel.context import ParallelContext

ESTIMATE_BATCHES = 8
"""Batches per rank whose mean norm sets s."""


@torch.no_grad()
def estimate_input_scale(source: ActivationSource, batch_size: int, ctx: ParallelContext, device: torch.device,
                         batches: int = ESTIMATE_BATCHES) -> float:
    """s = sqrt(d) / (mean L2 norm of the finite rows of `batches` batches of `batch_size` rows from every rank);
    collective. ValueError when no row is finite or the mean norm is 0."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # sum of norms, rows
    for _ in range(batches):
        x_TD = source.next_batch(batch_size).to(device)
        rows_TD = x_TD[torch.isfinite(x_TD).all(dim=1)].double()
        sums += torch.stack([rows_TD.norm(dim=1).sum(), rows_TD.new_tensor(rows_TD.shape[0])])
    total_norm, rows = ctx.all_reduce_sum(sums).tolist()
    if rows == 0 or total_norm == 0:
        raise ValueError(f"data.normalize_activations: the {batches} batches of every rank hold no finite, nonzero "
                         "activation to estimate the scale from")
    return math.sqrt(source.d_model) / (total_norm / rows)
