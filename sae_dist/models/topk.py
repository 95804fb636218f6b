"""The dense TopK SAE baseline (Gao et al. 2024): one expert of width M with an encoder bias, no router, AuxK."""

from __future__ import annotations

from torch import Tensor

from sae_dist.models.base import register
from sae_dist.models.expert_sae import ExpertSAE


@register("topk")
class TopKSAE(ExpertSAE):
    """z = TopK_k(ReLU(W_enc (x - b_pre) + b_enc)), x_hat = z W_dec + b_pre; AuxK weight 1/32 by default.

    The same expert compute as the Switch SAE, on a bank of one expert that every token reaches.
    """

    label = "TopK"
    encoder_bias = True
    default_auxk_alpha = 1 / 32

    def saelens_state(self) -> tuple[str, dict, dict[str, Tensor]]:
        """SAELens's 'topk' SAE: TopK_k(ReLU((x - b_dec) W_enc + b_enc)) W_dec + b_dec, the same math (the bank's
        one expert); a transcoder, which SAELens has no TopK class for, is the Switch transcoder with N = 1
        (`saelens_switch`)."""
        return self.saelens_expert_states()[0]
