"""The data path: activation sources (language model over text, synthetic, on-disk cache) behind one interface."""

from __future__ import annotations

import torch

from sae_dist.config import RunConfig
from sae_dist.data.cache import CachedActivationSource, write_cache
from sae_dist.data.lm import HookedLM, LMBlockReader, find_blocks, load_lm, splice
from sae_dist.data.shuffle import BlockShuffleSource
from sae_dist.data.source import ActivationSource, DataUnavailableError
from sae_dist.data.synthetic import SyntheticSource, feature_recovery
from sae_dist.data.text import TextContexts

__all__ = [
    "ActivationSource",
    "BlockShuffleSource",
    "CachedActivationSource",
    "DataUnavailableError",
    "HookedLM",
    "SyntheticSource",
    "TextContexts",
    "build_activation_source",
    "feature_recovery",
    "find_blocks",
    "load_lm",
    "splice",
    "write_cache",
]


def build_activation_source(
    run: RunConfig, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu"
) -> ActivationSource:
    """This rank's activation source for `run.data.source`; `device` is where the language model runs."""
    data, seed = run.data, run.trainer.seed
    if data.source == "synthetic":
        return SyntheticSource.from_config(data, seed, rank)
    if data.source == "cache":
        return CachedActivationSource(data.cache_dir, data.shuffle_buffer, seed, rank, world_size)
    model, tokenizer = load_lm(run.model, device)
    lm = HookedLM(model, run.model.layer)
    contexts = TextContexts.from_config(data, tokenizer, rank, world_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return BlockShuffleSource(LMBlockReader(lm, contexts, data.shuffle_buffer, data.lm_batch_size, pad_id), seed, rank)
