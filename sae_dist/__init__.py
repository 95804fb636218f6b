"""sae-dist: Switch Sparse Autoencoders with expert parallelism."""

from sae_dist.api import load_sae
from sae_dist.models import Latents, build_sae

__all__ = ["Latents", "build_sae", "load_sae"]
