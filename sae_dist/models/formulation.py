"""Which formulation of the expert compute a bank runs: `sae.encoder_backward_kernel` and `sae.decoder_kernel`,
'auto' resolved.

Both formulations compute the same forward and gradients (tests/models check every combination):
- encoder backward: 'sparse' (embedding_bag / scatter over the k selected latents, `SparseCompute`) or 'gemm' (the
  selected gradients scattered into a dense [rows, M_e] tensor, then grouped GEMMs, `GemmCompute`);
- decoder: 'gather' (embedding_bag over the k selected rows, `SparseCompute`) or 'gemm' (codes scattered into
  [rows, M_e], one grouped GEMM, `GemmCompute`).

The rule for 'auto':
- CPU: sparse and gather. The sparse weight gradient is a scatter over the k selected rows per token, where the
  GEMM one is a dense GEMM over the whole scattered [rows, M_e] gradient, as costly as the forward GEMM.
- CUDA: gemm and gemm for expert widths up to `GEMM_MAX_WIDTH`, sparse and gather above it. The GEMM
  formulation's backward costs grow with B x M_e and the sparse one's with B x k x d, so the crossover is a width,
  whatever N and B; full training steps in bf16 at d = 768, k = 32 put it between 8192 and 32768 latents per
  expert (docs/performance.md).
"""

from __future__ import annotations

import torch

from sae_dist.models.expert_compute import ExpertCompute
from sae_dist.models.gemm_compute import GemmCompute
from sae_dist.models.sparse_compute import SparseCompute

GEMM_MAX_WIDTH = 8192
"""Widest expert (latents) for which 'auto' picks the GEMM formulation on a GPU."""


def choose_compute(
    encoder_backward: str, decoder: str, device: torch.device, latents_per_expert: int
) -> tuple[ExpertCompute, ExpertCompute]:
    """(the encoder's compute, the decoder's) for experts of `latents_per_expert` latents on `device`, 'auto'
    resolved by the rule in this module's docstring. Halves of one formulation get one object (the sparse one's
    in-place weight gradients then cover both)."""
    gemm = device.type == "cuda" and latents_per_expert <= GEMM_MAX_WIDTH
    if encoder_backward == "auto":
        encoder_backward = "gemm" if gemm else "sparse"
    if decoder == "auto":
        decoder = "gemm" if gemm else "gather"
    sparse, grouped = SparseCompute(), GemmCompute()
    return (sparse if encoder_backward == "sparse" else grouped), (sparse if decoder == "gather" else grouped)
