"""Loss terms shared by every SAE (SPEC sections 2 and 4); the weights that combine them live in `total_loss`."""

from __future__ import annotations

from typing import Protocol

import torch
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
    return (x_TD.float() - x_hat_TD.float()).pow(2).sum() / max(x_TD.shape[0], 1)


def total_variance(x_TD: Tensor, reducer: BatchReducer | None = None) -> Tensor:
    """Sum over tokens and dims of (x - mean_x)^2, over the global batch when a reducer is given."""
    x = x_TD.double()
    sums = torch.cat([x.new_tensor([x.shape[0]]), x.sum(0), x.pow(2).sum(0)])
    if reducer is not None:
        sums = reducer.all_reduce_sum(sums)
    d = x_TD.shape[1]
    count, x_sum_D, x_sq_sum_D = sums[0], sums[1 : 1 + d], sums[1 + d :]
    return (x_sq_sum_D.sum() - x_sum_D.pow(2).sum() / count.clamp_min(1)).float()


def auxk_loss(x_TD: Tensor, x_hat_TD: Tensor, aux_recon_TD: Tensor, reducer: BatchReducer | None = None) -> Tensor:
    """AuxK (Gao et al. 2024): dead latents reconstruct the residual x - x_hat; normalised by the batch variance.

    With a reducer the variance is the global batch's and the rank's share is scaled by the world size, so that
    the mean over ranks (what gradient averaging takes) equals the single-device loss of the global batch.
    """
    residual_TD = (x_TD.float() - x_hat_TD.float()).detach()
    world = 1 if reducer is None else reducer.world_size
    error = (aux_recon_TD.float() - residual_TD).pow(2).sum()
    return world * error / total_variance(x_TD, reducer).clamp_min(1e-12)


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
