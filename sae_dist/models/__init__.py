"""SAE architectures: the Switch SAE, the dense TopK SAE and the ReLU SAE, built from a typed SAEConfig."""

from __future__ import annotations

from torch import nn

from sae_dist.config import SAEConfig
from sae_dist.models.dispatch import LocalDispatcher, TokenDispatcher
from sae_dist.models.relu import ReLUSAE
from sae_dist.models.switch import Latents, SAEOutput, SwitchSAE

__all__ = ["Latents", "LocalDispatcher", "ReLUSAE", "SAEOutput", "SwitchSAE", "TokenDispatcher", "build_sae"]


def build_sae(cfg: SAEConfig, d_model: int, seed: int, dispatcher: TokenDispatcher | None = None) -> nn.Module:
    """The SAE of `cfg.kind`; `dispatcher` (Switch only) decides which experts live here and how tokens arrive."""
    if cfg.kind == "relu":
        return ReLUSAE(cfg, d_model, seed)
    return SwitchSAE(cfg, d_model, seed, dispatcher)
