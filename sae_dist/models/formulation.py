"""Which formulation of the expert compute runs: the rule behind `sae.encoder_backward` and `sae.decoder` = auto.

Both formulations compute the same forward and gradients (tests/models check every combination):
- encoder backward: 'sparse' (embedding_bag / scatter over the k selected latents, `kernels.py`) or 'gemm' (the
  selected gradients scattered into a dense [rows, M_e] tensor, then grouped GEMMs, `grouped.py`);
- decoder: 'gather' (embedding_bag over the k selected rows) or 'gemm' (codes scattered into [rows, M_e], one
  grouped GEMM).

The rule for 'auto':
- CPU: sparse and gather. Measured here (2 cores, d = 768, k = 32, 4096 tokens, M_e = 8192): the weight-gradient
  scatter takes ~60 ms where the dense GEMM over the scattered gradient takes ~440 ms, the forward GEMM's cost.
- CUDA: gemm and gemm for expert widths up to `GEMM_MAX_WIDTH`, sparse and gather above it. On an H100 the
  grouped GEMMs of an M_e = 8192 expert take ~0.2 ms where the scatter/gather kernels took ~4 ms (issue 7's
  profile); at very large widths the dense [rows, M_e] gradient grows to gigabytes (16 GB at 8192 rows and
  M_e = 2^20 in bf16) and its GEMMs to 2x the forward's, while the sparse backward's cost does not depend on M_e.
  The threshold itself is not measured yet (no GPU here): it is the widest expert the probe ran (N = 32 at
  M = 2^20).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

GEMM_MAX_WIDTH = 32768
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
