"""Reading an on-disk activation cache: memory-mapped safetensors shards, checked, shuffled, sharded by rank.

A cache folder (written by `cache_writer.py` / `launch/cache_activations.py`) holds shards
`shard_RRRRR_IIIIII.safetensors` (rank R's shard I), each one tensor "activations" [rows, d] in float32, bfloat16
or float16, and `manifest.json`: d_model, dtype, num_tokens, the producing model, site and dataset, the run
config, and per shard its file, rows and sha256. Only the manifest makes a cache: it is written last. The site
(`site_record`) is the hookpoint as given, the module and side it resolved to, and the block number when it is a
block's output; a manifest whose site has no module (older caches) holds the output of its recorded layer. A cache
of transcoder rows [x | y] records its target site too ("target_site") and the split of d_model into "d_in" (x)
and "d_out" (y); a manifest without a target site holds an SAE's rows.

Opening checks every shard listed: present, a valid safetensors header of the manifest's dtype and shape, and the
exact file size, so a truncated shard fails at once with a one-line `DataUnavailableError` naming it; with
`verify` the ranks also split the sha256 check of the shards between them (a corrupt shard is named the same way).

Reading: units (see `order.py`) are chunks of at most `UNIT_ROWS` rows of one shard; unit g is chunk
perm_e[g mod C] of epoch e = g // C (C chunks, perm_e a permutation seeded by (seed, e)), so every epoch visits
the chunks of the whole cache in a new order, every rank reads disjoint chunks, and each shuffle block of
`shuffle_buffer` rows mixes chunks from all over the cache before the row-level permutation. Rows are copied
from the memory-mapped shards (through pinned memory and non-blocking copies to a GPU) into the block.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from sae_dist.config import ModelConfig
from sae_dist.data.shuffle import BlockShuffleSource, PreparedUnit
from sae_dist.data.sites import Site
from sae_dist.data.source import DataUnavailableError, derive_seed
from sae_dist.site_names import hookpoint_parts

MANIFEST = "manifest.json"
SHARD_KEY = "activations"
UNIT_ROWS = 4096
"""Rows per unit: the granularity of rank sharding, of the chunk-level shuffle and of exact resume."""
FILL_ROWS = 65536
"""Rows copied per `work_ahead` step while a block is filled."""
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_EPOCH_SALT = 0xCAC4E


def shard_name(rank: int, index: int) -> str:
    return f"shard_{rank:05d}_{index:06d}.safetensors"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(cache_dir: str | os.PathLike) -> dict:
    """The manifest of the cache in `cache_dir`; a one-line DataUnavailableError if there is none."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        unfinished = any(Path(cache_dir).glob("progress_*.json")) if Path(cache_dir).is_dir() else False
        why = "an unfinished cache: run the same launch/cache_activations.py command again to finish it" if unfinished else "no activation cache"
        raise DataUnavailableError(f"data.cache_dir={cache_dir} holds {why} (no {MANIFEST})")
    return json.loads(path.read_text())


def describe_cache(manifest: dict) -> str:
    """What a cache holds, in a few words from its manifest: 'gpt2 block 3 over text files a.txt, b.txt, ...'; for
    transcoder rows [x | y] both sites and widths: 'gpt2 transcoder rows: input of h.3.mlp (d_in=768) -> output of
    h.3.mlp (d_out=768) over ...'."""
    model, site, dataset = manifest.get("model") or {}, manifest.get("site") or {}, manifest.get("dataset") or {}
    name = Path(model["path"]).name if model.get("path") else model.get("name", "an unnamed model")
    files = dataset.get("data_files") or []
    shown = ", ".join(Path(f).name for f in files[:2]) + (", ..." if len(files) > 2 else "")
    data = f"{dataset.get('dataset', 'unknown data')}" + (f" files {shown}" if files else "")
    target = _recorded_target(manifest)
    if target is not None:
        d_out = cache_target_width(manifest)
        d_in = manifest.get("d_in")
        if d_in is None and d_out is not None and "d_model" in manifest:  # a `write_cache` cache records d_model
            d_in = manifest["d_model"] - d_out
        return (f"{name} transcoder rows: {_site_words(_recorded_site(manifest))} (d_in={d_in}) -> "
                f"{_site_words(target)} (d_out={d_out}) over {data}")
    where = (f" block {site['layer']}" if site.get("layer") is not None
             else f", {site['what']}," if site.get("what") else "")
    return f"{name}{where} over {data}"


def _site_words(site: dict) -> str:
    """A manifest's site record in words: 'block 3', 'output of h.3.mlp', or the hookpoint as given (all that a
    `write_cache` cache's config records)."""
    if site.get("layer") is not None:
        return f"block {site['layer']}"
    return site.get("what") or site.get("hookpoint") or "an unrecorded site"


def site_record(hookpoint: str | None, site: Site) -> dict:
    """A manifest's record of `site`: the hookpoint as given (None for `model.layer`), the module and side it
    resolved to, and the block number of a block's output (else None)."""
    return {"hookpoint": hookpoint, "module": site.module, "side": site.side, "layer": site.block,
            "what": site.describe() if site.block is None else f"output of block {site.block} ({site.module})"}


def _recorded_site(manifest: dict) -> dict:
    """The manifest's site; a cache written by `write_cache` records only its producing run's config."""
    if "site" in manifest:
        return manifest["site"]
    model = manifest.get("config", {}).get("model", {})
    return {"hookpoint": model.get("hookpoint"), "layer": None if model.get("hookpoint") else model.get("layer")}


def _recorded_target(manifest: dict) -> dict | None:
    """The manifest's target site (a cache of transcoder rows [x | y]); None for a cache of one site, which every
    manifest without a "target_site" is, unless it is a `write_cache` cache whose config names one."""
    if "target_site" in manifest:
        return manifest["target_site"]
    hookpoint = manifest.get("config", {}).get("model", {}).get("target_hookpoint")
    return None if hookpoint is None else {"hookpoint": hookpoint}


def _same_site(recorded: dict, hookpoint: str) -> bool:
    """Whether the site record `recorded` (of a module, not a block number) is the one `hookpoint` names."""
    module, side, given = (recorded.get(key) for key in ("module", "side", "hookpoint"))
    return hookpoint_parts(hookpoint) in {(module, side), hookpoint_parts(given) if given else None}


def cache_site_mismatch(manifest: dict, cfg: ModelConfig) -> str | None:
    """None when the cache of `manifest` holds the rows `cfg` reads (or does not say), else what it holds instead,
    e.g. "the output of block 3, not model.hookpoint=mlp_out.3": its site, and a transcoder's target site (a cache
    of [x | y] rows refuses an SAE's config and the other way round). A site recorded without a module (caches
    older than `model.hookpoint`) is the output of its layer; a manifest without a target site, an SAE's cache."""
    target = _recorded_target(manifest)
    if target is None and cfg.target_hookpoint is not None:
        return (f"an SAE's rows (one site, no target), not model.target_hookpoint={cfg.target_hookpoint}; write a "
                "cache with model.target_hookpoint set")
    if target is not None and cfg.target_hookpoint is None:
        return (f"a transcoder's rows [x | y] (target model.target_hookpoint={target['hookpoint']}), not an SAE's; "
                "set model.target_hookpoint and sae.d_out, or write a cache of one site")
    if target is not None and not _same_site(target, str(cfg.target_hookpoint)):
        held = f"the {target['side']} of {target['module']}" if target.get("module") else target["hookpoint"]
        return (f"the target {held}, not model.target_hookpoint={cfg.target_hookpoint}; train with the cache's "
                "sites or write a cache for these")
    recorded = _recorded_site(manifest)
    layer, module, side, hookpoint = (recorded.get(key) for key in ("layer", "module", "side", "hookpoint"))
    if layer is None and module is None and hookpoint is None:
        return None
    if cfg.hookpoint is None:
        if layer == cfg.layer:
            return None
        wanted = f"model.layer={cfg.layer}"
    else:
        if _same_site(recorded, cfg.hookpoint) or hookpoint_parts(cfg.hookpoint) == (f"resid_post.{layer}", "output"):
            return None
        wanted = f"model.hookpoint={cfg.hookpoint}"
    held = (f"the output of block {layer}" if layer is not None else
            f"the {side} of {module}" if module else f"model.hookpoint={hookpoint}")
    return f"{held}, not {wanted}; train with the cache's site or write a cache for this one"


def cache_target_width(manifest: dict) -> int | None:
    """d_out of a cache of transcoder rows [x | y] (recorded, or its `write_cache` config's `sae.d_out`); None for
    an SAE's cache."""
    if "d_out" in manifest:
        return manifest["d_out"]
    return manifest.get("config", {}).get("sae", {}).get("d_out")


class Shard(NamedTuple):
    path: Path
    rows: int
    sha256: str
    data_start: int
    """Byte offset of the rows in the file."""
    file_size: int


def _check_shard(path: Path, rows: int, d_model: int, dtype: torch.dtype) -> tuple[int, int]:
    """(data start, file size) of a shard whose header and size match; else a one-line DataUnavailableError."""
    if not path.is_file():
        raise DataUnavailableError(f"activation cache shard {path} is missing")
    size = path.stat().st_size
    expected = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": [rows, d_model]}
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > size - 8:  # garbage read as a length: never read (or allocate) past the file's end
                raise ValueError("header length beyond the file")
            entry = json.loads(f.read(header_len))[SHARD_KEY]
        begin, end = entry["data_offsets"]
        ok = {"dtype": entry["dtype"], "shape": entry["shape"]} == expected
    except (ValueError, KeyError, TypeError, OSError):
        raise DataUnavailableError(f"activation cache shard {path} is corrupt (unreadable header)") from None
    if not ok or end - begin != rows * d_model * dtype.itemsize:
        raise DataUnavailableError(f"activation cache shard {path} is corrupt (header does not match {expected})")
    if size != 8 + header_len + end:
        raise DataUnavailableError(f"activation cache shard {path} is incomplete ({size} of {8 + header_len + end} bytes)")
    return 8 + header_len + begin, size


def open_shards(cache_dir: str | os.PathLike, verify: bool = True, rank: int = 0, world_size: int = 1) -> tuple[dict, list[Shard]]:
    """(manifest, shards) of a cache, every shard checked (module docstring); with `verify`, shards rank,
    rank + world_size, ... also have their sha256 checked."""
    manifest = read_manifest(cache_dir)
    dtype = CACHE_DTYPES[manifest["dtype"]]
    shards = []
    for entry in manifest["shards"]:
        path = Path(cache_dir) / entry["file"]
        start, size = _check_shard(path, entry["rows"], manifest["d_model"], dtype)
        shards.append(Shard(path, entry["rows"], entry["sha256"], start, size))
    if verify:
        for shard in shards[rank::world_size]:
            if file_sha256(shard.path) != shard.sha256:
                raise DataUnavailableError(f"activation cache shard {shard.path} is corrupt (sha256 differs from {MANIFEST})")
    return manifest, shards


class CacheUnitReader:
    """A `UnitReader` over a cache (module docstring); `read_rows` reads global rows in order."""

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        seed: int = 0,
        device: str | torch.device = "cpu",
        verify: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.manifest, self.shards = open_shards(cache_dir, verify, rank, world_size)
        self.d_model: int = self.manifest["d_model"]
        self.dtype = CACHE_DTYPES[self.manifest["dtype"]]
        self.device = torch.device(device)
        self.seed = seed
        self.chunks = [
            (s, start, min(start + UNIT_ROWS, shard.rows))
            for s, shard in enumerate(self.shards)
            for start in range(0, shard.rows, UNIT_ROWS)
        ]
        self.total_rows = sum(shard.rows for shard in self.shards)
        if not self.total_rows:
            raise DataUnavailableError(f"activation cache {cache_dir} holds no rows")
        self._mapped: dict[int, Tensor] = {}
        self._orders: dict[int, list[int]] = {}

    def _rows(self, s: int) -> Tensor:
        """Shard s as a memory-mapped tensor [rows, d] (pages are read when touched)."""
        if s not in self._mapped:
            shard = self.shards[s]
            raw = torch.from_file(str(shard.path), shared=False, size=shard.file_size, dtype=torch.uint8)
            nbytes = shard.rows * self.d_model * self.dtype.itemsize
            self._mapped[s] = raw[shard.data_start : shard.data_start + nbytes].view(self.dtype).view(shard.rows, -1)
        return self._mapped[s]

    def _chunk_of(self, unit: int) -> tuple[int, int, int]:
        epoch, index = divmod(unit, len(self.chunks))
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, _EPOCH_SALT, epoch))
            self._orders = {epoch: torch.randperm(len(self.chunks), generator=gen).tolist()}
        return self.chunks[self._orders[epoch][index]]

    def prepare(self, units: Iterator[int]) -> Iterator[PreparedUnit]:
        for unit in units:
            s, start, stop = self._chunk_of(unit)
            yield PreparedUnit(unit, stop - start, (s, start, stop))

    def fill(self, prepared: list[PreparedUnit], out_ND: Tensor) -> Iterator[None]:
        row = 0
        while prepared:
            take, rows = 0, 0
            while take < len(prepared) and (take == 0 or rows < FILL_ROWS):
                rows += prepared[take].rows
                take += 1
            parts = [self._rows(s)[start:stop] for s, start, stop in (p.payload for p in prepared[:take])]
            if self.device.type == "cuda":
                staging_ND = torch.empty(rows, self.d_model, dtype=self.dtype, pin_memory=True)
                torch.cat(parts, out=staging_ND)
                out_ND[row : row + rows].copy_(staging_ND, non_blocking=True)
            else:
                torch.cat(parts, out=out_ND[row : row + rows])
            row += rows
            prepared = prepared[take:]
            yield

    def read_rows(self, start: int, stop: int) -> Tensor:
        """Global rows [start, stop) of the cache in shard order, float32 [stop - start, d] on the CPU."""
        parts, offset = [], 0
        for s, shard in enumerate(self.shards):
            if offset < stop and start < offset + shard.rows:
                parts.append(self._rows(s)[max(start, offset) - offset : min(stop, offset + shard.rows) - offset])
            offset += shard.rows
        return torch.cat(parts).float()

    def close(self) -> None:
        self._mapped.clear()


class CachedActivationSource(BlockShuffleSource):
    """The 'cache' source: this rank's chunks of an on-disk cache, shuffled, endless, exactly resumable on any
    world size. Blocks hold min(shuffle_buffer, rows / world_size) rows or more."""

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        shuffle_buffer: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        verify: bool = True,
    ) -> None:
        reader = CacheUnitReader(cache_dir, seed, device, verify, rank, world_size)
        block_rows = max(1, min(shuffle_buffer, reader.total_rows // world_size))
        super().__init__(reader, block_rows, seed, rank, world_size)
