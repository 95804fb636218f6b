"""A run folder: its file names, and how to find and read its checkpoints, metrics, history and config.

Training writes a run folder (`sae_dist.train`), evaluation and the launch tools read it (`sae_dist.eval`,
`launch/`); both take the layout from here:

    RUN/config.yaml                                   the run's config, written once when the run starts
    RUN/metrics.jsonl                                 one JSON object per logged step
    RUN/resume_history.jsonl                          each start and resume, with the settings changed on resume
    RUN/tensorboard/                                  the logged scalars for TensorBoard
    RUN/wandb_run_id, RUN/wandb/                      with trainer.wandb: the W&B run's id, and W&B's files
    RUN/checkpoints/latest                            name of the newest complete checkpoint
    RUN/checkpoints/step_00001000/model.safetensors   the model-only export in the single-device format (experts
                                                      stacked [N, M_e, d] in global order): what `load_sae` reads
    RUN/checkpoints/step_00001000/config.json         {"d_model": ..., "run": RunConfig as a dict, "step": ...,
                                                      "input_scale": s where data.normalize_activations is on,
                                                      "target_scale": s_y beside it for a transcoder}
    RUN/checkpoints/step_00001000/state/              torch.distributed.checkpoint: weights, optimizer state,
                                                      dead-latent counters (`sae_dist.train.checkpoint`)
    RUN/checkpoints/step_00001000/trainer_state.pt    step, tokens, scheduler, optimizer hyper-parameters, world size
    RUN/checkpoints/step_00001000/ranks/rank_00003.pt rank 3's data-source position and torch RNG state
    RUN/checkpoints/step_00001000/SHA256SUMS          SHA-256 of every file above (`sha256sum -c` format)
    RUN/checkpoints/step_00001000/eval.json           launch/evaluate.py's report (default place)
    RUN/checkpoints/step_00001000/geometry.json       launch/analyze.py's summary (default place)

Readers verify the checksums of what they load. A checkpoint without SHA256SUMS (written before checksums existed,
or the file deleted) is read unchecked with a one-line warning, or refused where `REQUIRE_CHECKSUMS_ENV`=1 is set:
an environment variable rather than a config option, because every reader (resume, evaluate.py, analyze.py,
export.py, ...) obeys it and a cluster sets it once for all of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from sae_dist import checksums
from sae_dist.config import ConfigError, RunConfig, as_dict
from sae_dist.console import say
from sae_dist.validation import from_dict

RUN_CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
HISTORY_FILE = "resume_history.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_DIR = "state"
STATE_FILE = "trainer_state.pt"
RANKS_DIR = "ranks"
EVAL_FILE = "eval.json"
GEOMETRY_FILE = "geometry.json"
INPUT_SCALE_KEY = "input_scale"
"""The entry of a checkpoint's config.json (and trainer_state.pt) holding s, the factor the SAE's inputs were
multiplied by in training (data.normalize_activations); absent when they were not."""
TARGET_SCALE_KEY = "target_scale"
"""The entry beside `INPUT_SCALE_KEY` holding s_y, the factor a transcoder's targets were multiplied by; absent for an
SAE (its target is its input) and where activations were not normalised."""
TMP_SUFFIX = ".tmp"
REQUIRE_CHECKSUMS_ENV = "SAE_DIST_REQUIRE_CHECKSUMS"
"""Set to 1: a checkpoint without SHA256SUMS is an error rather than a warning."""
_warned_unchecked: set[Path] = set()


class CheckpointError(ValueError):
    """A checkpoint cannot be found, read or written; the message is one line naming the file and the reason."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was expected."""


class NotARunError(CheckpointError, FileNotFoundError):
    """A folder given as a run folder lacks what training writes (its config.yaml, its logged metrics)."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(folder: Path) -> int:
    return int(Path(folder).name.removeprefix("step_"))


def rank_file(rank: int) -> str:
    return f"{RANKS_DIR}/rank_{rank:05d}.pt"


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- checkpoints --------------------------------------------------------------------------------------------------
def verify_files(folder: Path, names: list[str] | None = None) -> None:
    """The checkpoint's files `names` (default: all) against its SHA256SUMS; one-line CheckpointError otherwise.
    A checkpoint without SHA256SUMS is read unchecked after a warning (once per folder, by rank 0), or refused
    under SAE_DIST_REQUIRE_CHECKSUMS=1."""
    try:
        checked = checksums.verify(folder, names)
    except checksums.ChecksumError as exc:
        raise CheckpointError(f"checkpoint damaged: {exc}") from None
    if checked:
        return
    missing = Path(folder) / checksums.CHECKSUM_FILE
    if os.environ.get(REQUIRE_CHECKSUMS_ENV, "0") not in ("", "0"):
        raise CheckpointError(f"{missing} does not exist, so the checkpoint's files cannot be checked "
                              f"({REQUIRE_CHECKSUMS_ENV}=1 refuses unchecked checkpoints)")
    if Path(folder).absolute() not in _warned_unchecked and os.environ.get("RANK", "0") == "0":
        _warned_unchecked.add(Path(folder).absolute())
        say(f"warning: {missing} does not exist: the checkpoint's files are read unchecked (set "
            f"{REQUIRE_CHECKSUMS_ENV}=1 to refuse such checkpoints)")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none."""
    pointer = Path(run_dir) / CHECKPOINTS_DIR / LATEST_FILE
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    folder = pointer.parent / name
    if not name.startswith("step_") or not folder.is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint folder beside it")
    return folder


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder or a run directory (its latest checkpoint); one-line error otherwise."""
    path = Path(path)
    if (path / MODEL_FILE).exists():
        return path
    latest = latest_checkpoint(path)
    if latest is not None and (latest / MODEL_FILE).exists():
        return latest
    raise CheckpointNotFoundError(
        f"no SAE checkpoint at {str(path)!r}: expected {MODEL_FILE} or {CHECKPOINTS_DIR}/{LATEST_FILE}"
    )


def read_checkpoint_config(folder: Path) -> tuple[RunConfig, int, int]:
    """(run config, d_model, step) of a checkpoint folder (its config.json, checked against SHA256SUMS)."""
    path = Path(folder) / CONFIG_FILE
    verify_files(folder, [CONFIG_FILE])
    try:
        meta = json.loads(path.read_text())
        return from_dict(meta["run"]), int(meta["d_model"]), int(meta["step"])
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path} does not exist") from None
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, a missing entry, or a config the schema refuses
        reason = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"{path} is not a valid sae-dist checkpoint config ({reason})") from None


def read_input_scales(folder: Path) -> tuple[float | None, float | None]:
    """(s, s_y) of a checkpoint folder (`INPUT_SCALE_KEY`, `TARGET_SCALE_KEY`; s None: its SAE trained on raw
    activations; s_y None: on raw activations, or an SAE, whose target is its input)."""
    verify_files(folder, [CONFIG_FILE])
    meta = json.loads((Path(folder) / CONFIG_FILE).read_text())
    return meta.get(INPUT_SCALE_KEY), meta.get(TARGET_SCALE_KEY)


def load_model_weights(folder: Path, model: nn.Module) -> None:
    """The exported weights into a model holding every expert (single process, e.g. for analysis)."""
    path = Path(folder) / MODEL_FILE
    verify_files(folder, [MODEL_FILE])
    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError, RuntimeError) as exc:  # truncated or foreign file, or other shapes
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} cannot be loaded into the SAE its config.json describes ({reason})") from None


def checkpoint_title(folder: Path) -> str:
    """'<run folder name>/step_00001000' for a checkpoint inside a run folder, else the folder's name."""
    folder = Path(folder)
    return f"{folder.parent.parent.name}/{folder.name}" if folder.parent.name == CHECKPOINTS_DIR else folder.name


def find_report(run_dir: str | Path, filename: str) -> Path | None:
    """A report such as eval.json: in the run's latest checkpoint folder, else in the run folder, else None."""
    checkpoint = latest_checkpoint(run_dir)
    for folder in ([checkpoint] if checkpoint is not None else []) + [Path(run_dir)]:
        if (folder / filename).is_file():
            return folder / filename
    return None


# --- the run's config, metrics and history ------------------------------------------------------------------------
def read_run_config(run_dir: str | Path) -> RunConfig | None:
    """The run's config.yaml, or None when the folder has none; ConfigError when it is not a run config."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return from_dict(OmegaConf.to_container(OmegaConf.load(path)))
    except Exception as exc:  # not YAML, or not a run config: the folder belongs to something else
        raise ConfigError(f"{path} is not a run config ({error_text(exc)})") from None


def flat_settings(run: RunConfig) -> dict[str, Any]:
    """The run's settings by dotted name: {'sae.k': 32, 'trainer.steps': 1000, 'name': ..., ...}."""
    flat: dict[str, Any] = {}
    for key, value in as_dict(run).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": item for inner, item in value.items()})
        else:
            flat[key] = value
    return flat


def error_text(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file ([] when absent); a line cut short by a crash is skipped."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The logged rows of a run's metrics.jsonl, in order ({'step': ..., 'mse': ..., ...})."""
    return _read_jsonl(Path(run_dir) / METRICS_FILE)


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The events of a run's resume history."""
    return _read_jsonl(Path(run_dir) / HISTORY_FILE)
