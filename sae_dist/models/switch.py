"""The Switch SAE (docs/math.md section 2): a float32 router sends each token to one (or `sae.experts_per_token`) of N
TopK experts (`expert_sae.py`)."""

from __future__ import annotations

from torch import Tensor

from sae_dist.models.base import register
from sae_dist.models.expert_sae import ExpertSAE


@register("switch")
class SwitchSAE(ExpertSAE):
    """Router + N TopK experts without encoder bias; AuxK off unless `sae.auxk_alpha` is set (the paper's recipe)."""

    label = "Switch"
    routed = True

    def saelens_state(self) -> tuple[str, dict, dict[str, Tensor]]:
        """The 'sae_dist_switch' architecture ('sae_dist_switch_transcoder' for a transcoder) that
        `sae_dist.interop.saelens_switch` registers with SAELens (top-1 routing only)."""
        return switch_saelens_state(self)


def switch_saelens_state(sae: ExpertSAE) -> tuple[str, dict, dict[str, Tensor]]:
    """The 'sae_dist_switch' architecture's entries and weights of a routed SAE or transcoder (`saelens_switch`),
    its experts selecting by TopK (`activation` 'topk'; BatchTopK experts change it to 'threshold' and add their
    thresholds)."""
    if sae.cfg.experts_per_token != 1:
        raise NotImplementedError(f"sae.experts_per_token={sae.cfg.experts_per_token}: the SAELens export routes "
                                  "each token to one expert; export a run with 1")
    weights = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    return sae.saelens_switch(weights, sae.router)
