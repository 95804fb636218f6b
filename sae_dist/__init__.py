"""sae-dist: Switch Sparse Autoencoders with expert parallelism.

Importing the package hands the models' registry to the configuration's checks (`validation.use_architectures`),
which sit below the models and check each SAE kind's settings by asking it."""

from sae_dist import models, validation
from sae_dist.api import ActivationSite, activations, load_sae
from sae_dist.models import Latents, build_sae

validation.use_architectures(models.architecture)

__all__ = ["ActivationSite", "Latents", "activations", "build_sae", "load_sae"]
