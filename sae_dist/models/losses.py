"""Loss terms shared by every SAE (docs/math.md sections 2 and 4); the weights that combine them live in
`total_loss`."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class BatchReducer(Protocol):
    """Sums over the ranks that share one global batch (the parallel context; absent on one device)."""

    world_size: int

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum of `t` over all ranks, without gradient."""

    def sum_over_expert_replicas(self, t: Tensor) -> Tensor:
        """Sum of a per-local-expert tensor over the ranks holding the same experts, without gradient."""


def reconstruction_loss(x_TD: Tensor, x_hat_TD: Tensor) -> Tensor:
    """L_rec: mean over tokens of the sum over dims of (x - x_hat)^2 (the paper's MSE unit), in float32."""
    # One fused pass forward and one backward, where (x - x_hat).pow(2).sum() takes three and four.
    return F.mse_loss(x_hat_TD.float(), x_TD.float(), reduction="sum") / max(x_TD.shape[0], 1)


def total_variances(tensors_TD: list[Tensor], reducer: BatchReducer | None = None) -> Tensor:
    """Per tensor, the sum over tokens and dims of (t - mean_t)^2, over the global batch when a reducer is given
    (one all-reduce for all of them): float32 [len(tensors_TD)]."""
    # The count as a fill, not a tensor from a Python list: that would be a host-to-device copy, which waits.
    sums = torch.cat([torch.cat([t.new_full((1,), t.shape[0]), t.sum(0), t.pow(2).sum(0)])
                      for t in (t_TD.detach().double() for t_TD in tensors_TD)])
    if reducer is not None:
        sums = reducer.all_reduce_sum(sums)
    variances, start = [], 0
    for t_TD in tensors_TD:
        d = t_TD.shape[1]
        count, t_sum_D = sums[start], sums[start + 1 : start + 1 + d]
        t_sq_sum_D = sums[start + 1 + d : start + 1 + 2 * d]
        variances.append(t_sq_sum_D.sum() - t_sum_D.pow(2).sum() / count.clamp_min(1))
        start += 1 + 2 * d
    return torch.stack(variances).float()


def total_variance(x_TD: Tensor, reducer: BatchReducer | None = None) -> Tensor:
    """Sum over tokens and dims of (x - mean_x)^2, over the global batch when a reducer is given."""
    return total_variances([x_TD], reducer)[0]


def auxk_loss(
    x_TD: Tensor, x_hat_TD: Tensor, aux_recon_TD: Tensor, reducer: BatchReducer | None = None,
    scale: str = "x_variance",
) -> Tensor:
    """AuxK (Gao et al. 2024): dead latents reconstruct the residual e = x - x_hat (detached).

    With S = sum over tokens and dims of (aux - e)^2, T tokens and Var(t) = sum over tokens and dims of
    (t - mean_t)^2 of the batch (detached):
    - 'x_variance' (docs/math.md section 2): S / Var(x), dimensionless; against L_rec (a per-token sum) it weighs
      alpha * T / Var(x), i.e. alpha over the per-token variance of x.
    - 'gao' (Gao et al.'s code: L = MSE / Var(x) + alpha * MSE_aux / Var(e), times Var(x) to put it in L_rec's
      unit): (S / T) * Var(x) / Var(e), so that alpha weighs the normalised AuxK error against the normalised
      reconstruction error.
    With a reducer T and the variances are the global batch's and the rank's share is scaled by the world size, so
    that the mean over ranks (what gradient averaging takes) equals the single-device loss of the global batch.
    """
    residual_TD = (x_TD.float() - x_hat_TD.float()).detach()
    world = 1 if reducer is None else reducer.world_size
    error = world * (aux_recon_TD.float() - residual_TD).pow(2).sum()
    if scale == "x_variance":
        return error / total_variance(x_TD, reducer).clamp_min(1e-12)
    var_x, var_e = total_variances([x_TD, residual_TD], reducer)
    tokens = x_TD.shape[0] * world  # every rank holds B / W tokens
    return error * var_x / (tokens * var_e.clamp_min(1e-12))


def l1_penalty(f_TM: Tensor, w_dec_MD: Tensor) -> Tensor:
    """Mean over tokens of sum_j |f_j| * ||W_dec row j||."""
    return (f_TM.abs() * w_dec_MD.norm(dim=-1)).sum(dim=-1).mean()


def total_loss(terms: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """sum_name weights[name] * terms[name]; terms without a weight count once (the reconstruction)."""
    return sum(weights.get(name, 1.0) * value for name, value in terms.items())


def fired_mask(values: Tensor, indices: Tensor | None, num_latents: int) -> Tensor:
    """Bool [num_latents]: latents with a positive activation somewhere in the batch."""
    if indices is None:  # dense [T, M] activations
        return (values > 0).any(dim=0)
    # A count per latent rather than boolean indexing, which would read the number of hits back to the host.
    hits_L = torch.zeros(num_latents, dtype=torch.int32, device=values.device)
    return hits_L.index_add_(0, indices.flatten(), (values > 0).flatten().to(torch.int32)) > 0
