"""sae-dist: Switch Sparse Autoencoders with expert parallelism."""

from sae_dist.api import ActivationSite, activations, load_sae
from sae_dist.models import Latents, build_sae

__all__ = ["ActivationSite", "Latents", "activations", "build_sae", "load_sae"]
