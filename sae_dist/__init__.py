"""sae-dist: Switch Sparse Autoencoders with expert parallelism.

Importing the package hands the models' registry to the configuration (`config.use_architectures`), which sits
below the models and checks each SAE kind's settings by asking it."""

from sae_dist import config, models
from sae_dist.api import ActivationSite, activations, load_sae
from sae_dist.models import Latents, build_sae

config.use_architectures(models.architecture)

__all__ = ["ActivationSite", "Latents", "activations", "build_sae", "load_sae"]
