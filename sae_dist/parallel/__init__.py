"""Parallel machinery: the process layout and the collectives the trainer needs.

`ParallelContext` is the single-device layout; `ExpertParallelContext` (in `expert_parallel`) the torchrun one.
"""

from sae_dist.parallel.context import ParallelContext

__all__ = ["ParallelContext"]
