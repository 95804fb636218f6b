"""The Switch SAE (SPEC section 2): a float32 router sends each token to one of N TopK experts (`banked.py`)."""

from __future__ import annotations

from sae_dist.models.banked import BankedSAE
from sae_dist.models.base import register


@register("switch")
class SwitchSAE(BankedSAE):
    """Router + N TopK experts without encoder bias; AuxK off unless `sae.auxk_alpha` is set (the paper's recipe)."""

    routed = True
