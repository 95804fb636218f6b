"""SAE architectures behind one contract (`base.py`), built by name from a typed SAEConfig.

Each architecture module registers its class with `@register("<kind>")`; importing it here is its registration.
"""

from __future__ import annotations

# Importing an architecture registers it; this order is the order of the allowed kinds in errors.
from sae_dist.models import switch, topk, relu, batchtopk  # noqa: F401, I001
from sae_dist.models.base import SAE, Latents, SAEOutput, architecture, architecture_names, build_sae, register
from sae_dist.models.batchtopk import BatchTopKSAE
from sae_dist.models.relu import ReLUSAE
from sae_dist.models.routing import LocalDispatcher, TokenDispatcher
from sae_dist.models.switch import SwitchSAE
from sae_dist.models.topk import TopKSAE

__all__ = [
    "SAE", "BatchTopKSAE", "Latents", "LocalDispatcher", "ReLUSAE", "SAEOutput", "SwitchSAE", "TokenDispatcher", "TopKSAE",
    "architecture", "architecture_names", "build_sae", "register",
]
