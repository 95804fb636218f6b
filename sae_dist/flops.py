"""FLOPs accounting (SPEC section 6): the paper's encoder-only figure beside a complete count of what runs.

One multiply-add counts as 2 FLOPs. Per token and per training step (forward + backward):
- the paper counts only the encoder, 4*M*d for a dense SAE and 4*M*d/N for the Switch SAE (it ignores the router,
  TopK and the decoder);
- the complete count follows what sae-dist executes: router GEMM (Switch), the encoder GEMM over the chosen
  expert's M_e = M/N latents, a TopK selection pass over them (counted as M_e operations), the sparse decode of k
  rows, and the backward: 2x the forward GEMMs for the dense parts (router; everything in the ReLU SAE), and for
  the TopK kernels the sparse backward over the k active rows (input and weight gradients of encoder and decoder).
"""

from __future__ import annotations

from dataclasses import dataclass

from sae_dist.config import SAEConfig


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
    """FLOPs per token of one training step for `sae` on d-dimensional activations."""
    d, m = d_model, sae.num_latents
    if sae.kind == "relu":
        forward = 2 * m * d + m + 2 * m * d  # dense encoder, ReLU, dense decoder
        return FlopsPerToken(encoder_paper=4 * m * d, forward=forward, backward=2 * (4 * m * d))
    n, k = sae.num_experts, sae.k
    width = m // n  # the latents a token's encoder actually computes
    router = 2 * n * d + n if sae.kind == "switch" else 0  # GEMM + softmax
    forward = router + 2 * width * d + width + 2 * k * d  # encoder GEMM, TopK pass, sparse decode
    # Backward: router GEMM twice (input and weight grads); encoder and decoder sparse over the k active rows,
    # each with an input and a weight gradient of 2*k*d.
    backward = 2 * router + 4 * k * d + 4 * k * d
    return FlopsPerToken(encoder_paper=4 * width * d, forward=forward, backward=backward)


def training_flops(sae: SAEConfig, d_model: int, tokens: int) -> dict[str, float]:
    """Total training FLOPs over `tokens` tokens: the paper's encoder-only count and the complete one."""
    per_token = flops_per_token(sae, d_model)
    return {"encoder_paper": per_token.encoder_paper * tokens, "complete": per_token.total * tokens}
