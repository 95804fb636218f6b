"""Activation normalisation (data.normalize_activations='expected_average_only_in', SAELens's rule): the SAE trains
on s * x with s = sqrt(d) / E||x||_2, so that its inputs have mean L2 norm sqrt(d) whatever the scale of the site.
A transcoder (rows [x | y], docs/math.md section 9) trains on (s_x x, s_y y), each site with its own factor:
s_x = sqrt(d_in) / E||x||_2 and s_y = sqrt(d_out) / E||y||_2, estimated together over the same rows.

The factors are estimated once, before the first step, from the first `ESTIMATE_BATCHES` batches of every rank (drawn
from the stream, which the checkpoints' data positions then include); the sums are reduced over the ranks, so every
rank holds the same factors. The checkpoints save them (`TrainState`), a continued run restores them, and `load_sae`
folds them into the weights (`SAE.fold_input_scale_`, docs/math.md section 10).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sae_dist.data.source import ActivationSource
from sae_dist.parallel.context import ParallelContext

ESTIMATE_BATCHES = 8
"""Batches per rank whose mean norms set the factors."""


@torch.no_grad()
def estimate_input_scales(source: ActivationSource, batch_size: int, ctx: ParallelContext, device: torch.device,
                          d_in: int, batches: int = ESTIMATE_BATCHES) -> tuple[float, float | None]:
    """(s_x, s_y) from `batches` batches of `batch_size` rows from every rank, over their finite rows: s_x =
    sqrt(d_in) / (mean L2 norm of x = the rows' first `d_in` columns); s_y the same of the target y = the columns
    after them for a transcoder (rows wider than `d_in`), None for an SAE (y is x). Collective. ValueError when no
    row is finite or a mean norm is 0."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # sum of the norms of x, of y; rows
    for _ in range(batches):
        rows_TC = source.next_batch(batch_size).to(device)
        rows_TC = rows_TC[torch.isfinite(rows_TC).all(dim=1)].double()
        x_TD, y_TO = rows_TC[:, :d_in], rows_TC[:, d_in:]
        sums += torch.stack([x_TD.norm(dim=1).sum(), y_TO.norm(dim=1).sum(), rows_TC.new_tensor(rows_TC.shape[0])])
    x_norm, y_norm, rows = ctx.all_reduce_sum(sums).tolist()
    d_out = source.d_model - d_in
    if rows == 0 or x_norm == 0 or (d_out and y_norm == 0):
        raise ValueError(f"data.normalize_activations: the {batches} batches of every rank hold no finite, nonzero "
                         f"{'activation' if not d_out else 'input and target'} to estimate the scale from")
    target_scale = math.sqrt(d_out) / (y_norm / rows) if d_out else None
    return math.sqrt(d_in) / (x_norm / rows), target_scale


def scale_rows(rows_TC: Tensor, d_in: int, input_scale: float, target_scale: float | None) -> Tensor:
    """s_x x for an SAE's rows x (`target_scale` None); [s_x x | s_y y] for a transcoder's rows [x | y]."""
    if target_scale is None:
        return rows_TC * input_scale
    return torch.cat((rows_TC[:, :d_in] * input_scale, rows_TC[:, d_in:] * target_scale), dim=1)
