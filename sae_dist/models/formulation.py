"""Which formulation of the expert compute runs: the rule behind `sae.encoder_backward` and `sae.decoder` = auto.

Both formulations compute the same forward and gradients (tests/models check every combination):
- encoder backward: 'sparse' (embedding_bag / scatter over the k selected latents, `kernels.py`) or 'gemm' (the
  selected gradients scattered into a dense [rows, M_e] tensor, then grouped GEMMs, `grouped.py`);
- decoder: 'gather' (embedding_bag over the k selected rows) or 'gemm' (codes scattered into [rows, M_e], one
  grouped GEMM).

The rule for 'auto':
- CPU: sparse and gather. Measured here (2 cores, d = 768, k = 32, 4096 tokens, M_e = 8192): the weight-gradient
  scatter takes ~60 ms where the dense GEMM over the scattered gradient takes ~440 ms, the forward GEMM's cost.
- CUDA: gemm and gemm for expert widths up to `GEMM_MAX_WIDTH`, sparse and gather above it. The GEMM
  formulation's backward costs grow with B x M_e and the sparse one's with B x k x d, so the crossover is a width,
  whatever N and B. Measured on an H200 (bf16, d = 768, k = 32, B = 8192, 2026-11-26, full steps): at M_e = 2048
  gemm 6.4 ms against sparse 8.0; at M_e = 8192 gemm 6.9 against 7.5 (N = 8) and 19.1 against 18.9 (N = 32 of
  M = 262144); at M_e = 32768 gemm 23.2 against sparse 20.6; at M_e = 65536 (dense TopK) 22.7 against 16.1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

GEMM_MAX_WIDTH = 8192
"""Widest expert (latents) for which 'auto' picks the GEMM formulation on a GPU."""


class Formulation(NamedTuple):
    encoder_backward: str
    """'sparse' or 'gemm'."""
    decoder: str
    """'gather' or 'gemm'."""


def choose_formulation(
    encoder_backward: str, decoder: str, device: torch.device, latents_per_expert: int
) -> Formulation:
    """Resolve 'auto' by the rule in this module's docstring; explicit choices pass through."""
    gemm = device.type == "cuda" and latents_per_expert <= GEMM_MAX_WIDTH
    if encoder_backward == "auto":
        encoder_backward = "gemm" if gemm else "sparse"
    if decoder == "auto":
        decoder = "gemm" if gemm else "gather"
    return Formulation(encoder_backward, decoder)
