"""Checkpoints: one layout for one device and for W ranks, loadable on any other valid layout.

The files of a checkpoint folder are listed in `sae_dist.run_dir`, which also finds and reads them; this module
writes them and loads the sharded training state back.

`state/` holds global tensors: an expert tensor (and its optimizer state) is stored as [N, ...] indexed by global
expert id, each rank writing the rows of its own experts and replicated tensors written once. Loading reads the
rows a rank now owns, so a run saved on W ranks resumes on W' ranks with any valid P', or in one process.

Data positions: every rank reads the positions saved by all W ranks and takes its own with
`sae_dist.data.order.resume_state`: on the same W rank r continues rank r's stream bit for bit; on another W' the
text and cache streams are redistributed so that no document or cache row is read twice or skipped (the rule is
in `sae_dist/data/order.py`), and counter-based sources ('synthetic') continue the stream of rank r mod W.

A checkpoint is written to a temporary folder (by every rank), checksummed and renamed into place by rank 0 once
all ranks are done, and `latest` is replaced atomically, so a crash at any moment leaves `latest` naming a complete
one. Ranks agree after each phase of a save, so a failure on one rank (a full disk) fails the save on every rank:
the temporary folder is removed and the previous checkpoints are kept. Weights that are not finite are never
saved, so rotation never replaces the last good checkpoint. Readers verify the checksums of what they load.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException

from sae_dist import checksums
from sae_dist.config import RunConfig, as_dict
from sae_dist.parallel.context import ParallelContext
from sae_dist.run_dir import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    INPUT_SCALE_KEY,
    LATEST_FILE,
    MODEL_FILE,
    RANKS_DIR,
    STATE_DIR,
    STATE_FILE,
    TARGET_SCALE_KEY,
    TMP_SUFFIX,
    CheckpointError,
    checkpoint_name,
    checkpoint_step,
    latest_checkpoint,
    rank_file,
    verify_files,
    write_atomically,
)
from sae_dist.train.agreed_writes import WriteFailedError, existing_ancestor, write_in_phases


class NonFiniteWeightsError(CheckpointError):
    """The weights to be saved hold NaN or inf: nothing is written, so no good checkpoint is rotated away."""


class TrainingTensors(NamedTuple):
    """The tensors a checkpoint shards: loaded in place."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    dead_L: Tensor
    """Tokens since each local latent last fired."""


def write_model_tensors(folder: Path, tensors: dict[str, Tensor], run: RunConfig, d_model: int, step: int,
                        input_scale: float | None = None, target_scale: float | None = None) -> None:
    """model.safetensors + config.json in `folder` (which must exist) from a full (single-device) state dict;
    `input_scale`: the factor s the SAE's inputs were multiplied by in training (data.normalize_activations),
    `target_scale`: s_y, a transcoder's targets'."""
    save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(folder / MODEL_FILE))
    meta = {"format_version": 1, "d_model": d_model, "step": step, "run": as_dict(run)}
    if input_scale is not None:
        meta[INPUT_SCALE_KEY] = input_scale
    if target_scale is not None:
        meta[TARGET_SCALE_KEY] = target_scale
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


# --- the sharded state --------------------------------------------------------------------------------------------
def _dcp_options(ctx: ParallelContext) -> dict[str, Any]:
    return {} if ctx.distributed else {"no_dist": True}


@contextmanager
def _dcp_call() -> Iterator[None]:
    """A DCP save or load: without DCP's notice that a single process saves without a process group (intended
    here), and with Ctrl-C's KeyboardInterrupt, which DCP wraps like any error a rank raised into a
    CheckpointException (a traceback), raised again as an interruption."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            yield
        except CheckpointException as exc:
            if any(isinstance(error, KeyboardInterrupt) for error, _ in exc.failures.values()):
                raise KeyboardInterrupt from exc
            raise


def _view(sharded: bool, t: Tensor, ctx: ParallelContext) -> Tensor:
    """A state-dict entry as DCP should see it: expert-sharded tensors as global tensors."""
    return ctx.sharded_view(t) if sharded and t.dim() else t


def sharded_state(tensors: TrainingTensors, ctx: ParallelContext) -> dict[str, Any]:
    """The DCP state dict: every tensor aliases live storage, expert-sharded ones (as the model declares them)
    viewed as global tensors."""
    model = tensors.model
    sharded = model.expert_sharded()
    model_state = {name: _view(name in sharded, t, ctx) for name, t in model.state_dict().items()}
    optim_state = {
        name: {key: _view(name in sharded, value, ctx) for key, value in tensors.optimizer.state[param].items()}
        for name, param in model.named_parameters()
    }
    dead = {"tokens_since_fired": ctx.sharded_view(tensors.dead_L)}
    return {"model": model_state, "optim": optim_state, "dead": dead}


def _empty_optimizer_state(tensors: TrainingTensors, folder: Path) -> dict[str, dict]:
    """Zero optimizer state of the shapes saved in `folder` (Adam's state does not exist before its first step)."""
    saved = dcp.FileSystemReader(str(folder / STATE_DIR)).read_metadata().state_dict_metadata
    state: dict[str, dict] = {}
    for name, param in tensors.model.named_parameters():
        prefix = f"optim.{name}."
        entries = {key[len(prefix) :]: meta for key, meta in saved.items() if key.startswith(prefix)}
        state[name] = {
            key: torch.zeros_like(param) if len(meta.size) else torch.zeros((), dtype=meta.properties.dtype)
            for key, meta in entries.items()
        }
    return state


class CheckpointWriteError(CheckpointError, WriteFailedError):
    """Writing a checkpoint failed on some rank; nothing of it was kept."""


def weights_are_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def save_checkpoint(
    run_dir: Path,
    run: RunConfig,
    d_model: int,
    step: int,
    tensors: TrainingTensors,
    run_state: dict[str, Any],
    rank_state: dict[str, Any],
    ctx: ParallelContext,
    rotate: bool = True,
) -> Path:
    """Write checkpoint `step` collectively, point `latest` at it, and keep only the newest `keep_checkpoints`
    (unless not `rotate`: then the caller rotates, `rotate_checkpoints`).

    `run_state` (identical on all ranks) is written by rank 0, `rank_state` by each rank. Raises
    NonFiniteWeightsError (writing nothing) when a weight is NaN or inf, CheckpointWriteError (one line, naming the
    disk error, the partial checkpoint removed) when a file cannot be written on any rank.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / checkpoint_name(step)
    tmp = root / (final.name + TMP_SUFFIX)
    device = next(tensors.model.parameters()).device
    finite = ctx.all_reduce_sum(torch.tensor([float(weights_are_finite(tensors.model))], device=device))
    if float(finite.sum()) < ctx.world_size:
        raise NonFiniteWeightsError(
            f"the weights hold NaN or inf at step {step}: checkpoint not written, earlier checkpoints kept"
        )

    def describe(disk: OSError) -> str:
        where = disk.filename or root
        previous = latest_checkpoint(run_dir)
        kept = f"{previous.name} is intact" if previous is not None else "there is no earlier checkpoint"
        free = shutil.disk_usage(existing_ancestor(root)).free
        return (f"cannot write checkpoint {final.name}: {disk.strerror or disk} ({where}; "
                f"{free / 2**30:.2f} GiB free); the partial checkpoint was removed and {kept}")

    def make_folder() -> None:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / RANKS_DIR).mkdir(parents=True)

    def write_shards() -> None:
        with _dcp_call():
            dcp.save(sharded_state(tensors, ctx), checkpoint_id=str(tmp / STATE_DIR), **_dcp_options(ctx))
        torch.save(rank_state, tmp / rank_file(ctx.rank))

    def publish() -> None:
        if not ctx.is_main:
            return
        export_model(tmp, run, d_model, step, run_state.get(INPUT_SCALE_KEY), run_state.get(TARGET_SCALE_KEY))
        param_groups = tensors.optimizer.state_dict()["param_groups"]
        torch.save({**run_state, "param_groups": param_groups, "world_size": ctx.world_size}, tmp / STATE_FILE)
        checksums.write_checksums(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_atomically(root / LATEST_FILE, final.name.encode())
        if rotate:
            rotate_checkpoints(root, run.trainer.keep_checkpoints, step)

    write_in_phases(ctx, device, (make_folder, write_shards, publish), root, describe,
                    lambda: _discard_unpublished(tmp, final, run_dir), CheckpointWriteError)
    return final


def _discard_unpublished(tmp: Path, final: Path, run_dir: Path) -> None:
    """Remove what a failed save wrote: its temporary folder, and its final folder unless `latest` names it."""
    shutil.rmtree(tmp, ignore_errors=True)
    if final.exists() and latest_checkpoint(run_dir) != final:
        shutil.rmtree(final, ignore_errors=True)


def rotate_checkpoints(root: Path, keep: int, current_step: int) -> None:
    """Delete all but the `keep` newest checkpoints up to `current_step` (the one `latest` names). Each is renamed
    to a temporary name first (atomic), so a kill while deleting leaves a folder that `remove_partial_checkpoints`
    removes at the next start, never a half-deleted checkpoint under its own name."""
    done = sorted(p for p in root.glob("step_*[0-9]") if checkpoint_step(p) <= current_step)
    for old in done[:-keep]:
        doomed = old.with_name(old.name + TMP_SUFFIX)
        shutil.rmtree(doomed, ignore_errors=True)  # what an earlier kill here left
        old.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def remove_partial_checkpoints(run_dir: Path) -> list[Path]:
    """Remove what killed saves left: temporary folders, and checkpoints newer than `latest` (renamed into place
    but never published). Returns what was removed. Called by rank 0 before training starts."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    latest = latest_checkpoint(run_dir)
    newest = checkpoint_step(latest) if latest is not None else -1
    leftovers = [p for p in root.glob(f"step_*{TMP_SUFFIX}")]
    leftovers += [p for p in root.glob("step_*[0-9]") if checkpoint_step(p) > newest]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    (root / (LATEST_FILE + TMP_SUFFIX)).unlink(missing_ok=True)
    return leftovers


def read_global_state(folder: Path, prefix: str = "") -> dict[str, Tensor]:
    """The full tensors of a checkpoint's sharded state whose keys start with `prefix` (one process reads all).

    Keys are flattened ('model.b_pre', 'optim.experts.w_enc.exp_avg', 'dead.tokens_since_fired'); the prefix is
    removed from the returned names.
    """
    saved = dcp.FileSystemReader(str(Path(folder) / STATE_DIR)).read_metadata().state_dict_metadata
    full = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in saved.items()
        if key.startswith(prefix)
    }
    with _dcp_call():
        dcp.load(full, checkpoint_id=str(Path(folder) / STATE_DIR), no_dist=True)
    return {key[len(prefix) :]: t for key, t in full.items()}


def export_model(folder: Path, run: RunConfig, d_model: int, step: int, input_scale: float | None = None,
                 target_scale: float | None = None) -> None:
    """Write the single-file model export of a checkpoint from its sharded state."""
    write_model_tensors(folder, read_global_state(folder, "model."), run, d_model, step, input_scale, target_scale)


def load_checkpoint(folder: Path, tensors: TrainingTensors, ctx: ParallelContext, verified: bool = False
                    ) -> tuple[dict, list[dict]]:
    """Load a checkpoint's sharded state into `tensors` (in place, on this layout); return (run_state, the
    rank states of every rank that saved it, in rank order).

    Every file is checked against the checkpoint's SHA256SUMS first (CheckpointError when one differs), unless
    `verified`: checked already, before anything was loaded (`plan.prepare_run`)."""
    folder = Path(folder)
    if not verified:
        verify_files(folder)
    run_state = torch.load(folder / STATE_FILE, weights_only=False)
    empty = _empty_optimizer_state(tensors, folder)
    target = sharded_state(tensors, ctx)
    sharded = tensors.model.expert_sharded()
    target["optim"] = {
        name: {key: _view(name in sharded, t, ctx) for key, t in state.items()} for name, state in empty.items()
    }
    with _dcp_call():
        dcp.load(target, checkpoint_id=str(folder / STATE_DIR), **_dcp_options(ctx))
    params = [p for group in tensors.optimizer.param_groups for p in group["params"]]
    index = {id(p): i for i, p in enumerate(params)}
    state = {index[id(param)]: empty[name] for name, param in tensors.model.named_parameters()}
    tensors.optimizer.load_state_dict({"state": state, "param_groups": run_state.pop("param_groups")})
    saved_world = run_state.pop("world_size")
    return run_state, [torch.load(folder / rank_file(rank), weights_only=False) for rank in range(saved_world)]
