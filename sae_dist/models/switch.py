"""The Switch SAE (SPEC section 2): a float32 router sends each token to one (or `sae.experts_per_token`) of N TopK
experts (`banked.py`)."""

from __future__ import annotations

from torch import Tensor

from sae_dist.models.banked import BankedSAE
from sae_dist.models.base import register

SWITCH_ARCHITECTURE = "sae_dist_switch"
"""The name of the Switch SAE's architecture in SAELens's registry."""


@register("switch")
class SwitchSAE(BankedSAE):
    """Router + N TopK experts without encoder bias; AuxK off unless `sae.auxk_alpha` is set (the paper's recipe)."""

    label = "Switch"
    routed = True

    def saelens_state(self) -> tuple[str, dict, dict[str, Tensor]]:
        """The 'sae_dist_switch' architecture that `sae_dist.interop.saelens_switch` registers with SAELens (top-1
        routing only)."""
        if self.cfg.experts_per_token != 1:
            raise NotImplementedError(f"sae.experts_per_token={self.cfg.experts_per_token}: the SAELens export "
                                      "routes each token to one expert; export a run with 1")
        weights = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_dec": self.b_dec,
                   "W_router": self.router.weight, "b_router": self.router.b_router}
        return SWITCH_ARCHITECTURE, {"k": self.cfg.k, "num_experts": self.cfg.num_experts}, weights
