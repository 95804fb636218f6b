"""The Switch SAE (docs/math.md section 2): a float32 router sends each token to one (or `sae.experts_per_token`) of N
TopK experts (`expert_sae.py`)."""

from __future__ import annotations

from torch import Tensor

from sae_dist.models.base import register
from sae_dist.models.expert_sae import ExpertSAE, refuse_transcoder

SWITCH_ARCHITECTURE = "sae_dist_switch"
"""The name of the Switch SAE's architecture in SAELens's registry."""


@register("switch")
class SwitchSAE(ExpertSAE):
    """Router + N TopK experts without encoder bias; AuxK off unless `sae.auxk_alpha` is set (the paper's recipe)."""

    label = "Switch"
    routed = True

    def saelens_state(self) -> tuple[str, dict, dict[str, Tensor]]:
        """The 'sae_dist_switch' architecture that `sae_dist.interop.saelens_switch` registers with SAELens (top-1
        routing only)."""
        return switch_saelens_state(self)


def switch_saelens_state(sae: ExpertSAE) -> tuple[str, dict, dict[str, Tensor]]:
    """The 'sae_dist_switch' architecture's entries and weights of a routed SAE, its experts selecting by TopK
    (`activation` 'topk'; BatchTopK experts change it to 'threshold' and add their thresholds)."""
    refuse_transcoder(sae, "Switch")
    if sae.cfg.experts_per_token != 1:
        raise NotImplementedError(f"sae.experts_per_token={sae.cfg.experts_per_token}: the SAELens export routes "
                                  "each token to one expert; export a run with 1")
    weights = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec,
               "W_router": sae.router.weight, "b_router": sae.router.b_router}
    return SWITCH_ARCHITECTURE, {"k": sae.cfg.k, "num_experts": sae.cfg.num_experts, "activation": "topk"}, weights
