"""An on-disk activation cache: safetensors shards plus a JSON manifest, read back with a block shuffle.

Layout of a cache folder: `shard_00000.safetensors`, ... each holding one tensor "activations" [rows, d], and
`manifest.json` {d_model, dtype, num_tokens, shards: [{file, rows}], config}. Every file is written under a
temporary name and renamed into place, and the manifest comes last, so a crash leaves either no cache or
complete shards that no manifest lists yet; a reader trusts only the manifest.

Reading: the rows of all shards, in order, are cut into global blocks of S = min(shuffle_buffer, rows // W)
rows; rank r owns blocks r, r + W, r + 2W, ... and cycles through them epoch after epoch, each block shuffled
by `BlockShuffleSource`. The reader's position is one block counter, so resume re-reads one block.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from sae_dist.data.shuffle import BlockShuffleSource
from sae_dist.data.source import ActivationSource, DataUnavailableError

MANIFEST = "manifest.json"
_KEY = "activations"


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write, renamed to `path` on success and deleted on failure."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_cache(
    source: ActivationSource,
    out_dir: str | os.PathLike,
    num_tokens: int,
    shard_tokens: int,
    config: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `num_tokens` activations of `source` as shards of `shard_tokens` rows; returns the manifest path.

    `config` (e.g. the producing run's config as a dict) is stored in the manifest; `dtype` is the on-disk
    dtype (reading always yields float32).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        raise FileExistsError(f"{out} already holds an activation cache; choose another folder")
    shards = []
    for index, start in enumerate(range(0, num_tokens, shard_tokens)):
        rows = min(shard_tokens, num_tokens - start)
        acts = source.next_batch(rows).to(dtype).contiguous()
        name = f"shard_{index:05d}.safetensors"
        with _atomic_path(out / name) as tmp:
            save_file({_KEY: acts}, str(tmp))
        shards.append({"file": name, "rows": rows})
    manifest = {
        "d_model": source.d_model,
        "dtype": str(dtype).removeprefix("torch."),
        "num_tokens": num_tokens,
        "shards": shards,
        "config": config or {},
    }
    with _atomic_path(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return out / MANIFEST


def read_manifest(cache_dir: str | os.PathLike) -> dict:
    """The manifest of the cache in `cache_dir`; a one-line DataUnavailableError if there is none."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise DataUnavailableError(f"data.cache_dir={cache_dir} holds no activation cache (no {MANIFEST})")
    return json.loads(path.read_text())


class CacheBlockReader:
    """A `BlockReader` over a cache: rank `rank`'s blocks of S rows, cycled over epochs (see module docstring)."""

    def __init__(self, cache_dir: str | os.PathLike, block_rows: int, rank: int = 0, world_size: int = 1) -> None:
        manifest = read_manifest(cache_dir)
        self.d_model: int = manifest["d_model"]
        self.files = [Path(cache_dir) / shard["file"] for shard in manifest["shards"]]
        missing = [str(f) for f in self.files if not f.is_file()]
        if missing:
            raise DataUnavailableError(f"activation cache {cache_dir} lacks shard {missing[0]}")
        rows = [shard["rows"] for shard in manifest["shards"]]
        self.starts = [sum(rows[:i]) for i in range(len(rows) + 1)]
        total = self.starts[-1]
        if total < world_size:
            raise DataUnavailableError(
                f"activation cache {cache_dir} holds {total} rows, fewer than {world_size} ranks"
            )
        self.block_rows = min(block_rows, total // world_size)
        self.my_blocks = list(range(rank, math.ceil(total / self.block_rows), world_size))
        self._block = 0

    def position(self) -> dict:
        return {"block": self._block}

    def seek(self, position: dict) -> None:
        self._block = int(position["block"])

    def read_rows(self, start: int, stop: int) -> Tensor:
        """Global rows [start, stop) of the cache, float32 [stop - start, d]."""
        parts = []
        for file, lo, hi in zip(self.files, self.starts[:-1], self.starts[1:], strict=True):
            if lo < stop and start < hi:
                with safe_open(str(file), framework="pt") as f:
                    parts.append(f.get_slice(_KEY)[max(start, lo) - lo : min(stop, hi) - lo])
        return torch.cat(parts).float()

    def read_block(self) -> Tensor:
        block = self.my_blocks[self._block % len(self.my_blocks)]
        self._block += 1
        start = block * self.block_rows
        return self.read_rows(start, min(start + self.block_rows, self.starts[-1]))


class CachedActivationSource(BlockShuffleSource):
    """The 'cache' source: this rank's share of an on-disk cache, block-shuffled, endless, exactly resumable."""

    def __init__(
        self, cache_dir: str | os.PathLike, shuffle_buffer: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__(CacheBlockReader(cache_dir, shuffle_buffer, rank, world_size), seed, rank)
