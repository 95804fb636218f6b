"""Writing an activation cache (layout: `cache.py`), resumably and by several ranks in parallel.

Rank r of W writes its share of the rows (num_tokens / W, the first num_tokens mod W ranks one more) from its
own activation source as shards `shard_r_i`. After each shard it writes `progress_r.json`: the shards done with
their sha256, the source's state after them and the settings they depend on. Every file is written under a
temporary name and renamed, so a crash at any moment leaves complete shards and a progress file that names only
complete shards; running the same job again continues each rank from its progress (on the same world size) and
writes the same bytes an uninterrupted job would. When every rank is done, rank 0 writes `manifest.json` (the
only file that makes a cache) and removes the progress files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from sae_dist.config import ConfigError
from sae_dist.data.cache import MANIFEST, SHARD_KEY, file_sha256, shard_name
from sae_dist.data.source import ActivationSource

FORMAT_VERSION = 1
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


class CacheExistsError(ConfigError):
    """The output folder already holds a complete cache (a one-line error naming it)."""


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write, renamed to `path` on success and deleted on failure."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, value: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1))


def save_shard(acts_ND: torch.Tensor, path: Path) -> None:
    """One shard file; a failed write is the OSError behind it (safetensors reports 'os error N' as text)."""
    try:
        save_file({SHARD_KEY: acts_ND}, str(path))
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None
    os.chmod(path, _FILE_MODE)  # safetensors creates files readable by the owner only


def progress_file(out: Path, rank: int) -> Path:
    return out / f"progress_{rank:05d}.json"


def rows_written(out_dir: str | os.PathLike, rank: int) -> int:
    """Rows of rank `rank`'s shards already in `out_dir` (from its progress file; 0 without one)."""
    path = progress_file(Path(out_dir), rank)
    return sum(entry["rows"] for entry in json.loads(path.read_text())["shards"]) if path.exists() else 0


def rank_rows(num_tokens: int, rank: int, world_size: int) -> int:
    return num_tokens // world_size + (rank < num_tokens % world_size)


_CACHE_FILE = re.compile(r"shard_\d+_\d+\.safetensors|progress_\d+\.json")
"""The names of a cache's files besides the manifest: shards, progress files (of an unfinished cache)."""
_CACHE_JOB_FILE = re.compile(rf"{_CACHE_FILE.pattern}|\..+\.tmp|\.lock|\.sae-dist-write-test-.*")
"""The names a cache job writes besides the manifest: a cache's files, temporary files, its folder's lock, the
writability probe."""


def holds_cache_files(folder: Path) -> bool:
    """`folder` holds a cache, finished or not (its manifest, shards or progress files)."""
    return (folder / MANIFEST).exists() or (
        folder.is_dir() and any(_CACHE_FILE.fullmatch(entry.name) for entry in folder.iterdir()))


def check_cache_folder(out: Path) -> None:
    """`out` may take a cache: new, empty, or an unfinished cache's. A finished cache is CacheExistsError; a folder
    holding anything else (a run folder, a model, a home folder) a ConfigError naming one of its entries, so that
    shards are never mixed into another tool's files."""
    if (out / MANIFEST).exists():
        raise CacheExistsError(f"cache.out_dir={out} already holds an activation cache; choose another folder")
    if out.is_dir():
        foreign = sorted(entry.name for entry in out.iterdir() if not _CACHE_JOB_FILE.fullmatch(entry.name))
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise ConfigError(f"cache.out_dir={out} holds what no cache job writes ({foreign[0]!r}{more}); choose a "
                              "new or empty folder")


def write_shards(
    source: ActivationSource,
    out_dir: str | os.PathLike,
    num_tokens: int,
    shard_tokens: int,
    dtype: torch.dtype = torch.float32,
    settings: dict | None = None,
    rank: int = 0,
    world_size: int = 1,
    on_shard: Callable[[int], None] | None = None,
) -> list[dict]:
    """Rank `rank`'s shards of a `num_tokens`-row cache, resumed from its progress file; returns their entries.

    `settings` (JSON-able: model, data, seed, ...) must equal those of an unfinished job in `out_dir`;
    `on_shard(rows)` is called after each shard (progress bars).
    """
    out = Path(out_dir)
    check_cache_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    identity = {"settings": settings or {}, "num_tokens": num_tokens, "shard_tokens": shard_tokens,
                "dtype": str(dtype).removeprefix("torch."), "world_size": world_size, "d_model": source.d_model}
    progress = {"identity": identity, "shards": [], "source": None}
    if progress_file(out, rank).exists():
        saved = json.loads(progress_file(out, rank).read_text())
        changed = [key for key in identity if saved["identity"].get(key) != identity[key]]
        if changed:
            raise ConfigError(
                f"cache.out_dir={out} holds an unfinished cache made with other {', '.join(changed)}; "
                "run the job that started it again, or choose another folder"
            )
        progress = saved
        source.load_state_dict(saved["source"])
    done = sum(entry["rows"] for entry in progress["shards"])
    quota = rank_rows(num_tokens, rank, world_size)
    if on_shard is not None and done:
        on_shard(done)
    while done < quota:
        rows = min(shard_tokens, quota - done)
        acts_ND = source.next_batch(rows).to(dtype).cpu().contiguous()
        name = shard_name(rank, len(progress["shards"]))
        with atomic_path(out / name) as tmp:
            save_shard(acts_ND, tmp)
        progress["shards"].append({"file": name, "rows": rows, "sha256": file_sha256(out / name)})
        progress["source"] = source.state_dict()
        write_json(progress_file(out, rank), progress)
        done += rows
        if on_shard is not None:
            on_shard(rows)
    return progress["shards"]


def batches_left(out_dir: str | os.PathLike, num_tokens: int, shard_tokens: int, rank: int, world_size: int) -> int:
    """How many `next_batch(shard_tokens)` calls `write_shards` still makes for rank `rank`."""
    left = rank_rows(num_tokens, rank, world_size) - rows_written(out_dir, rank)
    return max(0, -(-left // shard_tokens))


class _Wrapped(ActivationSource):
    """A source that serves another's batches differently: its position and its closing are the other's."""

    def __init__(self, source: ActivationSource) -> None:
        self.source = source
        self.d_model = source.d_model

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)

    def close(self) -> None:
        self.source.close()


class BatchBudget(_Wrapped):
    """`source` that serves `batches` batches, then refuses more and does no work ahead: put under a prefetching
    source, its producer ends once the job's last batch is made instead of computing one nobody will take (for a
    cache of LM activations, a forward of a whole shuffle block that the end of the job then waits for)."""

    def __init__(self, source: ActivationSource, batches: int) -> None:
        super().__init__(source)
        self.left = batches

    def next_batch(self, batch_size: int) -> torch.Tensor:
        if self.left <= 0:
            raise BudgetSpent("every batch of the job has been made")
        self.left -= 1
        return self.source.next_batch(batch_size)

    def work_ahead(self) -> bool:
        return self.left > 0 and self.source.work_ahead()


class FullBatches(_Wrapped):
    """`source` asked for batches of `rows` rows only, a smaller batch cut from a full one. A prefetching source
    asked for another size stops its producer and rewinds, which recomputes the LM forwards of the block being
    served; the rows are the same for a source whose batches are consecutive rows of one stream (block-shuffled
    sources), not for one that draws each batch afresh (the synthetic source). Its state after a cut batch is past
    the rows cut off: use it for a job's last batch only."""

    def __init__(self, source: ActivationSource, rows: int) -> None:
        super().__init__(source)
        self.rows = rows

    def next_batch(self, batch_size: int) -> torch.Tensor:
        assert batch_size <= self.rows, (batch_size, self.rows)
        return self.source.next_batch(self.rows)[:batch_size]


class BudgetSpent(RuntimeError):
    """A `BatchBudget` asked for one batch more than the job needs (only its prefetch producer ever is)."""


def finish_cache(out_dir: str | os.PathLike, world_size: int, metadata: dict | None = None) -> Path:
    """Write the manifest from the progress files of all `world_size` ranks (all complete); returns its path."""
    out = Path(out_dir)
    progress = [json.loads(progress_file(out, rank).read_text()) for rank in range(world_size)]
    identity = progress[0]["identity"]
    shards = [entry for rank_progress in progress for entry in rank_progress["shards"]]
    manifest = {
        "format_version": FORMAT_VERSION,
        "d_model": identity["d_model"],
        "dtype": identity["dtype"],
        "num_tokens": sum(entry["rows"] for entry in shards),
        "world_size": world_size,
        **(metadata or {}),
        # Where each rank's source stopped: for a block-shuffled source the units (documents, in the order the
        # source read them) it consumed, whole shuffle blocks at a time (`sae_dist.data.order`).
        "source_states": [rank_progress["source"] for rank_progress in progress],
        "shards": shards,
    }
    write_json(out / MANIFEST, manifest)
    for rank in range(world_size):
        progress_file(out, rank).unlink()
    return out / MANIFEST


def write_cache(
    source: ActivationSource,
    out_dir: str | os.PathLike,
    num_tokens: int,
    shard_tokens: int,
    config: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """One process: `num_tokens` rows of `source` as shards of `shard_tokens` rows; returns the manifest path.

    `config` (e.g. the producing run's config as a dict) is stored in the manifest under "config"."""
    write_shards(source, out_dir, num_tokens, shard_tokens, dtype, {"config": config or {}})
    return finish_cache(out_dir, 1, {"config": config or {}})
