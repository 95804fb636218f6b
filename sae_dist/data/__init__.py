"""The data path: activation sources (language model over text, synthetic, on-disk cache) behind one interface.

transformers and datasets load when the 'lm' source is built, not when this package is imported: a synthetic or
cached run, and a command refusing bad input, never pay their import."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from sae_dist.config import RunConfig
from sae_dist.data.cache import CachedActivationSource, CacheUnitReader, read_manifest
from sae_dist.data.cache_writer import write_cache
from sae_dist.data.lm import HookedLM, LMUnitReader, load_lm
from sae_dist.data.sites import Site, check_target_width, find_blocks, model_site, resolve_site, run_sites, splice
from sae_dist.data.order import resume_state
from sae_dist.data.prefetch import PrefetchingSource
from sae_dist.data.shuffle import BlockShuffleSource
from sae_dist.data.source import ActivationSource, DataUnavailableError
from sae_dist.data.synthetic import SyntheticSource, feature_recovery
from sae_dist.data.text import Documents, TextContexts, load_text_dataset, stream_reading
from sae_dist.data.tokenize import PretokenizedContexts, Tokenization

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ActivationSource",
    "BlockShuffleSource",
    "CacheUnitReader",
    "CachedActivationSource",
    "DataUnavailableError",
    "HookedLM",
    "PrefetchingSource",
    "Site",
    "SyntheticSource",
    "TextContexts",
    "build_activation_source",
    "feature_recovery",
    "find_blocks",
    "lm_activation_source",
    "load_lm",
    "model_site",
    "pretokenize_processes",
    "read_manifest",
    "resolve_site",
    "resume_state",
    "run_sites",
    "site_columns",
    "splice",
    "write_cache",
]


TOKENS_PER_S_PER_GPU = 1_000_000
"""What one GPU's LM and SAE step consume (GPT-2 small to block 8 and the Switch SAE on an H100/H200, bf16)."""
TOKENS_PER_S_PER_WORKER = 125_000
"""Tokens/s of one tokenising process, on the safe side: 242k from 2 workers beside an NVIDIA H200 before
`ContextCutter`, which cuts 1.36x more per CPU-second (about 0.5M on one AMD EPYC core; python-docs, MiniLM's
tokenizer, 2026-11-26; docs/performance-log.md)."""
CORES_FOR_THE_TRAINER = 2
"""Cores a rank keeps for itself: the training thread and the prefetch thread (LM launches, shuffling)."""


def cores_per_local_rank() -> int:
    """The cores this process may run on, shared by the node's ranks (LOCAL_WORLD_SIZE, set by torchrun)."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def tokenizer_workers(run: RunConfig, device: torch.device) -> int:
    """`data.tokenizer_workers`, 'auto' (null) resolved: none on a CPU, whose cores the LM needs; beside a GPU as
    many as reach TOKENS_PER_S_PER_GPU at TOKENS_PER_S_PER_WORKER each (8), within the rank's share of the node's
    cores less CORES_FOR_THE_TRAINER."""
    if run.data.tokenizer_workers is not None:
        return run.data.tokenizer_workers
    if device.type == "cpu":
        return 0
    wanted = -(-TOKENS_PER_S_PER_GPU // TOKENS_PER_S_PER_WORKER)
    return max(0, min(wanted, cores_per_local_rank() - CORES_FOR_THE_TRAINER))


def pretokenize_processes() -> int:
    """Processes for `data.pretokenize`: the cores of this node, shared by its ranks (each rank pretokenises, or
    reads what `datasets` cached)."""
    return cores_per_local_rank()


def lm_activation_source(
    run: RunConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rank: int = 0,
    world_size: int = 1,
    sites: Sequence[int | str] | None = None,
    document_seed: int | None = None,
) -> BlockShuffleSource:
    """The 'lm' source over a loaded model: `sites` (block numbers or hookpoints; default: the run's sites,
    `model.hookpoint` or block `model.layer`, and a transcoder's `model.target_hookpoint`, rows [x | y]) read over
    `run.data`'s text, this rank's documents, block-shuffled (no prefetch); the documents in the corpus's order, or
    with `document_seed` in a seeded order over the whole corpus (`text.sampled_order`). A target site whose width
    is not `sae.d_out` is a one-line ConfigError."""
    data = run.data
    lm = HookedLM(model, list(sites) if sites is not None else run_sites(model, run.model), run.model.compile)
    if sites is None:
        check_target_width(run.model, lm.widths[-1], run.sae.d_out)
    documents = Documents(load_text_dataset(data, document_seed), data.text_column, stream_reading(data))
    if data.pretokenize:
        tokenization = PretokenizedContexts(documents.dataset, tokenizer, data.ctx_len, data.text_column,
                                            pretokenize_processes())
    else:
        tokenization = Tokenization(tokenizer, data.ctx_len, tokenizer_workers(run, lm.device))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    reader = LMUnitReader(lm, documents, tokenization, data.lm_batch_size, pad_id)
    return BlockShuffleSource(reader, data.shuffle_buffer, run.trainer.seed, rank, world_size)


def site_columns(source: ActivationSource) -> list[slice]:
    """The columns of each site in the rows of an 'lm' source read at several sites (`build_activation_source`'s
    `sites`), in their order."""
    while not isinstance(source, BlockShuffleSource):
        source = source.source  # a PrefetchingSource's inner source
    bounds = np.cumsum([0, *source.reader.lm.widths])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def build_activation_source(
    run: RunConfig,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    sites: Sequence[int | str] | None = None,
) -> ActivationSource:
    """This rank's activation source for `run.data.source`, producing on `device` (where the language model runs
    and training happens), `data.prefetch` batches ahead in a background thread when that is > 0. `sites` (lm
    only: block numbers or hookpoints) reads several sites in one pass, rows concatenated [n, sum of widths]."""
    data, seed, device = run.data, run.trainer.seed, torch.device(device)
    if data.source == "synthetic":
        source: ActivationSource = SyntheticSource.from_config(data, seed, rank, device, run.sae.d_out)
    elif data.source == "cache":
        source = CachedActivationSource(
            data.cache_dir, data.shuffle_buffer, seed, rank, world_size, device, data.cache_verify
        )
    else:
        model, tokenizer = load_lm(run.model, device)
        source = lm_activation_source(run, model, tokenizer, rank, world_size, sites)
    return PrefetchingSource(source, data.prefetch, device) if data.prefetch > 0 else source
