"""Parallel machinery: the process layout and the collectives the trainer needs."""

from sae_dist.parallel.context import ParallelContext

__all__ = ["ParallelContext"]
