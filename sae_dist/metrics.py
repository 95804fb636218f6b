"""The one definition of the reconstruction metrics (docs/math.md section 6), from sums that add across batches and
ranks.

`ReconstructionSums` holds float64 sums over tokens; adding two of them (or all-reducing the packed vector over
ranks) gives the sums of the union, so training logs, evaluation over many batches and expert-parallel runs all
report the same quantities (x below is what is reconstructed: a transcoder's target y, docs/math.md section 9):
- MSE: mean over tokens of sum over dims of (x - x_hat)^2 (the paper's unit);
- FVU: sum_dims Var(x - x_hat) / sum_dims Var(x);
- L0: mean active latents per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ReconstructionSums:
    tokens: Tensor
    squared_error: Tensor
    """Sum over tokens and dims of (x - x_hat)^2."""
    x_sum_D: Tensor
    x_sq_sum_D: Tensor
    residual_sum_D: Tensor
    residual_sq_sum_D: Tensor
    active: Tensor
    """Sum over tokens of the number of active latents."""

    @classmethod
    @torch.no_grad()
    def of_batch(cls, x_TD: Tensor, x_hat_TD: Tensor, active: Tensor | int) -> "ReconstructionSums":
        x = x_TD.double()
        residual = x - x_hat_TD.double()
        return cls(
            tokens=torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device),
            squared_error=residual.pow(2).sum(),
            x_sum_D=x.sum(0),
            x_sq_sum_D=x.pow(2).sum(0),
            residual_sum_D=residual.sum(0),
            residual_sq_sum_D=residual.pow(2).sum(0),
            active=torch.as_tensor(active, dtype=torch.float64, device=x.device),
        )

    def pack(self) -> Tensor:
        """All sums as one float64 vector, for a single all-reduce."""
        d = self.x_sum_D.numel()
        scalars = torch.stack([self.tokens, self.squared_error, self.active])
        return torch.cat([scalars, self.x_sum_D, self.x_sq_sum_D, self.residual_sum_D, self.residual_sq_sum_D]).view(
            3 + 4 * d
        )

    @classmethod
    def unpack(cls, packed: Tensor) -> "ReconstructionSums":
        d = (packed.numel() - 3) // 4
        x_sum, x_sq, r_sum, r_sq = packed[3:].view(4, d)
        return cls(packed[0], packed[1], x_sum, x_sq, r_sum, r_sq, packed[2])

    def __add__(self, other: "ReconstructionSums") -> "ReconstructionSums":
        return ReconstructionSums.unpack(self.pack() + other.pack())

    def metrics(self) -> dict[str, float]:
        n = self.tokens.clamp_min(1)
        var_x = (self.x_sq_sum_D / n - (self.x_sum_D / n).pow(2)).sum()
        var_residual = (self.residual_sq_sum_D / n - (self.residual_sum_D / n).pow(2)).sum()
        return {
            "mse": float(self.squared_error / n),
            "fvu": float(var_residual / var_x.clamp_min(1e-30)),
            "l0": float(self.active / n),
        }
