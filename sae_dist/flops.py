"""FLOPs accounting (docs/math.md section 6): the paper's encoder-only figure beside a complete count of what runs.

One multiply-add counts as 2 FLOPs. Per token and per training step (forward + backward):
- the paper counts only the encoder, 4*M*d for a dense SAE and 4*M*d/N for the Switch SAE (it ignores the router,
  TopK and the decoder);
- the complete count follows what sae-dist executes; each architecture states it (`SAE.flops_per_token` in
  sae_dist/models/base.py and its subclasses): for TopK-style experts the router GEMM (routed kinds), the encoder
  GEMM over the chosen expert's M_e = M/N latents, a TopK selection pass over them (counted as M_e operations), the
  sparse decode of k rows, and the backward over the k active rows; for the ReLU SAE dense GEMMs, backward twice.
- a transcoder (docs/math.md section 9) counts its decoder at d_out and adds its skip GEMM, 2 * d_in * d_out per token
  forward and twice that backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from sae_dist.config import SAEConfig
from sae_dist.validation import architecture_facts


@dataclass(frozen=True)
class FlopsPerToken:
    encoder_paper: float
    """The paper's figure: encoder only, forward + backward (4 * width * d)."""
    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def flops_per_token(sae: SAEConfig, d_model: int) -> FlopsPerToken:
    """FLOPs per token of one training step for `sae` on d-dimensional activations (its architecture's count)."""
    return architecture_facts(sae.kind).flops_per_token(sae, d_model)


def training_flops(sae: SAEConfig, d_model: int, tokens: int) -> dict[str, float]:
    """Total training FLOPs over `tokens` tokens: the paper's encoder-only count and the complete one."""
    per_token = flops_per_token(sae, d_model)
    return {"encoder_paper": per_token.encoder_paper * tokens, "complete": per_token.total * tokens}
