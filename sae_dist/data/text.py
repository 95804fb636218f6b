"""Text for the 'lm' source: a `datasets` dataset, sharded across ranks and cut into token contexts.

`data.dataset` is a Hub name (streamed when `data.streaming`), a local builder with files (`text`, `json`, ...
with `data.data_files`), a local dataset folder, 'pydoc-topics': the English documentation CPython ships in
`pydoc_data.topics`, one document per topic, or 'python-docs': those topics plus the standard library's
docstrings (about 1.7 MB of English; see `python_docs.py`), both available on any machine.

Training reads documents by global index through `Documents` (document g is document g mod n of the dataset, so
epochs follow each other) and the ranks share them out as `order.py` says. `TextContexts` streams one dataset
(or one rank's `split_dataset_by_node` share) context by context, for evaluation and inspection.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sae_dist.config import ConfigError, DataConfig
from sae_dist.data.builder_files import builder_options, named_builder_errors, named_stream_errors
from sae_dist.data.python_docs import python_docs_dataset
from sae_dist.data.source import DataUnavailableError, require_hub

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset
    from transformers import PreTrainedTokenizerBase

LOCAL_BUILDERS = ("text", "json", "csv", "parquet", "arrow")
"""`datasets` builders that read `data.data_files` from disk."""

PYDOC_TOPICS = "pydoc-topics"
PYTHON_DOCS = "python-docs"

_LOCAL_HINT = (
    "use local files instead: data.dataset=text data.data_files=[a.txt,b.txt] (or data.dataset=json), "
    "or data.dataset=python-docs"
)


def require_hub_dataset(data: DataConfig) -> None:
    """A dataset that only the Hub has (not a builtin, a local builder or a folder) is reachable there, or, under
    HF_HUB_OFFLINE (where `datasets` reads its caches), in a Hugging Face cache of this machine: else one-line
    DataUnavailableError, within seconds."""
    import datasets  # what it reads is its offline setting; only 'lm' runs load it

    local = data.dataset in (PYDOC_TOPICS, PYTHON_DOCS, *LOCAL_BUILDERS) or os.path.exists(data.dataset)
    if local:
        return
    if not datasets.config.HF_HUB_OFFLINE:
        require_hub(data.dataset, "dataset", _LOCAL_HINT)
    elif not _in_hf_cache(data.dataset):
        raise DataUnavailableError(f"cannot download dataset '{data.dataset}' from the Hub (HF_HUB_OFFLINE is set "
                                   f"and it is in no Hugging Face cache here); {_LOCAL_HINT}")


def _in_hf_cache(repo_id: str) -> bool:
    """Whether the Hub cache (hub/datasets--ORG--NAME) or the `datasets` cache (ORG___NAME) holds the dataset,
    asked of the disk alone."""
    import datasets
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"
    prepared = Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")
    return hub.is_dir() or prepared.is_dir()


def sampled_order(dataset: Dataset | IterableDataset, seed: int) -> Dataset | IterableDataset:
    """The documents in an order seeded by `seed` over the whole corpus, so that reading stopped early (a cache of
    part of a corpus) holds documents from all of it: a map-style dataset's documents permuted (the same
    permutation every epoch); a stream's files or shards permuted (`IterableDataset.shuffle`, buffer of one), the
    documents within one in order."""
    from datasets import Dataset

    if isinstance(dataset, Dataset):
        return dataset.shuffle(seed=seed, keep_in_memory=True)
    return dataset.shuffle(seed=seed, buffer_size=1)


def load_text_dataset(data: DataConfig, document_seed: int | None = None) -> Dataset | IterableDataset:
    """The full (all ranks) document dataset named by `data.dataset`, reduced to the text column; in the corpus's
    own order, or with `document_seed` in the `sampled_order` it seeds."""
    dataset = _load_text_dataset(data)
    return dataset if document_seed is None else sampled_order(dataset, document_seed)


def stream_reading(data: DataConfig) -> Callable[[], AbstractContextManager[None]]:
    """What to hold around each read of `data`'s dataset: for a stream of local files, `named_stream_errors` (a file
    damaged past its first record named in one line), else nothing."""
    if data.streaming and data.dataset in LOCAL_BUILDERS:
        return partial(named_stream_errors, data)
    return nullcontext


def _load_text_dataset(data: DataConfig) -> Dataset | IterableDataset:
    from datasets import Dataset, load_dataset

    if data.dataset == PYDOC_TOPICS:
        from pydoc_data.topics import topics

        return Dataset.from_dict({data.text_column: [topics[key] for key in sorted(topics)]})
    if data.dataset == PYTHON_DOCS:
        return python_docs_dataset(data.text_column)
    if data.dataset in LOCAL_BUILDERS:
        if not data.data_files:
            raise ConfigError(f"data.dataset={data.dataset!r} needs data.data_files=[...]")
        try:
            with named_builder_errors(data):
                ds = load_dataset(
                    data.dataset, data_files=list(data.data_files), split=data.split, streaming=data.streaming,
                    **builder_options(data),
                )
        except FileNotFoundError as exc:
            raise DataUnavailableError(f"data.data_files: {str(exc).splitlines()[0]}") from None
    elif os.path.exists(data.dataset):
        ds = load_dataset(data.dataset, split=data.split, streaming=data.streaming)
    else:
        require_hub_dataset(data)  # fail fast rather than let `datasets` retry for ~30 s
        try:
            ds = load_dataset(data.dataset, split=data.split, streaming=data.streaming)
        except (OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0]
            raise DataUnavailableError(f"cannot load dataset '{data.dataset}' ({reason}); {_LOCAL_HINT}") from None
    return ds.select_columns([data.text_column])


class TextContexts:
    """An endless, rank-local stream of token contexts with a seekable position.

    Documents are read in order and each is tokenised and cut into contexts of at most `ctx_len` tokens (the
    tokenizer's special tokens included per context, e.g. [CLS] ... [SEP] for BERT; the last, shorter one
    kept). When the documents run out, the next epoch starts from the first. The position is
    (epoch, doc, ctx): the next context is context `ctx` of document `doc` of epoch `epoch`.
    """

    def __init__(
        self, dataset: Dataset | IterableDataset, tokenizer: PreTrainedTokenizerBase, ctx_len: int, text_column: str,
        reading: Callable[[], AbstractContextManager[None]] = nullcontext,
    ) -> None:
        self.dataset = dataset
        """This rank's documents."""
        self.cut = ContextCutter(tokenizer, ctx_len)
        self.text_column = text_column
        self.reading = reading
        """Held around each read of the dataset (`stream_reading`)."""
        self.seek({"epoch": 0, "doc": 0, "ctx": 0})

    @classmethod
    def from_config(
        cls, data: DataConfig, tokenizer: PreTrainedTokenizerBase, rank: int = 0, world_size: int = 1
    ) -> TextContexts:
        from datasets.distributed import split_dataset_by_node

        shard = split_dataset_by_node(load_text_dataset(data), rank=rank, world_size=world_size)
        return cls(shard, tokenizer, data.ctx_len, data.text_column, stream_reading(data))

    def position(self) -> dict:
        return {"epoch": self._epoch, "doc": self._doc, "ctx": self._ctx}

    def seek(self, position: dict) -> None:
        self._epoch, self._doc, self._ctx = int(position["epoch"]), int(position["doc"]), int(position["ctx"])
        self._docs: Iterator[dict] | None = None
        self._contexts: list[list[int]] | None = None

    def _next_text(self) -> str:
        if self._docs is None:
            self._docs = iter(self.dataset.skip(self._doc) if self._doc else self.dataset)
        with self.reading():
            row = next(self._docs, None)
        if row is None:
            if self._doc == 0:
                raise DataUnavailableError("this rank's share of the dataset holds no documents")
            self._epoch, self._doc, self._docs = self._epoch + 1, 0, None
            return self._next_text()
        return row[self.text_column]

    def next_context(self) -> list[int]:
        """Token ids of the next context, 1 to `ctx_len` of them."""
        while True:
            if self._contexts is None:
                self._contexts = [ids.tolist() for ids in self.cut([self._next_text()])[0]]
            if self._ctx < len(self._contexts):
                self._ctx += 1
                return self._contexts[self._ctx - 1]
            self._doc, self._ctx, self._contexts = self._doc + 1, 0, None


def cut_documents(tokenizer: PreTrainedTokenizerBase, texts: list[str], ctx_len: int) -> list[list[np.ndarray]]:
    """Each text tokenised (one batched call) and cut into contexts of at most `ctx_len` token ids (int32), the
    tokenizer's special tokens included per context (e.g. [CLS] ... [SEP] for BERT), the last, shorter one kept."""
    encoded = tokenizer(
        texts,
        max_length=ctx_len,
        truncation=True,
        return_overflowing_tokens=True,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    contexts: list[list[np.ndarray]] = [[] for _ in texts]
    for ids, doc in zip(encoded["input_ids"], encoded["overflow_to_sample_mapping"], strict=True):
        if ids:
            contexts[doc].append(np.asarray(ids, dtype=np.int32))
    return contexts


class ContextCutter:
    """`cut_documents` for one tokenizer and `ctx_len`, without its per-context Python work: the Rust tokenizer
    encodes a batch without special tokens or offsets (`encode_batch_fast`, over several threads unless
    TOKENIZERS_PARALLELISM=false) and NumPy cuts each document's ids into runs of `ctx_len` minus the special
    tokens, each framed by them. The tokenizer's truncation with overflow cuts the same runs and frames them the
    same way, so the contexts are those of `cut_documents` (tested). A tokenizer that has no Rust backend,
    truncates on the left, or whose post-processor does more than frame the ids is cut by `cut_documents`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, ctx_len: int) -> None:
        self.tokenizer, self.ctx_len = tokenizer, ctx_len
        self._backend = _unbounded_backend(tokenizer)
        self._frame = _special_frame(self._backend) if self._backend is not None else None
        self.fast = self._frame is not None
        """Whether texts are cut by the fast path (else by `cut_documents`)."""
        if self.fast and ctx_len <= sum(len(ids) for ids in self._frame):
            raise ConfigError(f"data.ctx_len={ctx_len} leaves no room for text beside the tokenizer's special tokens")

    def __call__(self, texts: list[str]) -> list[list[np.ndarray]]:
        """Each text's contexts: int32 token ids, at most `ctx_len` each, in order."""
        if not self.fast:
            return cut_documents(self.tokenizer, texts, self.ctx_len)
        prefix, suffix = self._frame
        body = self.ctx_len - len(prefix) - len(suffix)
        contexts: list[list[np.ndarray]] = []
        for encoding in self._backend.encode_batch_fast(texts, add_special_tokens=False):
            ids = np.array(encoding.ids, dtype=np.int32)
            # A text of no tokens is one context of the special tokens alone (none without them), as truncation has it.
            starts = range(0, len(ids), body) if len(ids) else range(1 if len(prefix) + len(suffix) else 0)
            contexts.append([np.concatenate((prefix, ids[start : start + body], suffix)) for start in starts])
        return contexts


def _unbounded_backend(tokenizer: PreTrainedTokenizerBase):
    """A private copy of the tokenizer's Rust backend without truncation or padding (the wrapper sets both on its
    backend per call), or None where the fast path cannot stand for the wrapper."""
    if not getattr(tokenizer, "is_fast", False) or tokenizer.truncation_side != "right":
        return None
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return backend


def _special_frame(backend) -> tuple[np.ndarray, np.ndarray] | None:
    """(prefix, suffix) int32 ids that the post-processor puts around a single sequence's ids, or None when it does
    anything else (checked on two sequences of different lengths, one empty)."""
    probe = backend.encode("The quick brown fox, 42.", add_special_tokens=False)
    ids, framed = probe.ids, backend.post_process(probe).ids
    starts = [p for p in range(len(framed) - len(ids) + 1) if framed[p : p + len(ids)] == ids] if ids else []
    if not starts:
        return None
    prefix, suffix = framed[: starts[0]], framed[starts[0] + len(ids) :]
    if backend.post_process(backend.encode("", add_special_tokens=False)).ids != prefix + suffix:
        return None
    return np.array(prefix, dtype=np.int32), np.array(suffix, dtype=np.int32)


class Documents:
    """The texts of a dataset by global index: document g is document g mod n (n documents per epoch).

    A map-style dataset is read by index in one call per request; an iterable (streaming) one is scanned in
    order, from the start again when an earlier document is asked for, so rank-sharded reading costs each rank
    a scan of the whole stream.
    """

    def __init__(self, dataset: Dataset | IterableDataset, text_column: str,
                 reading: Callable[[], AbstractContextManager[None]] = nullcontext) -> None:
        from datasets import Dataset

        self.dataset = dataset
        self.text_column = text_column
        self.reading = reading
        """Held around each read of a stream (`stream_reading`)."""
        self._by_index = isinstance(dataset, Dataset)
        """A map-style dataset, read by index (else a stream, scanned)."""
        self.per_epoch: int | None = len(dataset) if self._by_index else None
        """n, once known (at once for a map-style dataset, after one full scan for a stream)."""
        if self.per_epoch == 0:
            raise DataUnavailableError("the dataset holds no documents")
        self._scan: Iterator[dict] | None = None
        self._scan_next = self._epoch_start = 0
        """Global index of the document the scan yields next, and of the first document of its epoch."""

    def texts(self, indices: list[int]) -> list[str]:
        """The texts of documents `indices` (global indices, any order)."""
        if self._by_index:
            return self.dataset[[g % self.per_epoch for g in indices]][self.text_column]
        return [self._scanned(g) for g in indices]

    def _scanned(self, g: int) -> str:
        if self._scan is None or g < self._scan_next:
            self._scan_next = g - g % self.per_epoch if self.per_epoch else 0
            self._scan, self._epoch_start = iter(self.dataset), self._scan_next
        while True:
            with self.reading():
                row = next(self._scan, None)
            if row is None:  # the end of an epoch
                if self._scan_next == self._epoch_start:
                    raise DataUnavailableError("the dataset holds no documents")
                self.per_epoch = self._scan_next - self._epoch_start
                self._scan, self._epoch_start = iter(self.dataset), self._scan_next
                continue
            self._scan_next += 1
            if self._scan_next - 1 == g:
                return row[self.text_column]
