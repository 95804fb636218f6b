"""A run's identity: the settings that define a run and cannot change when it continues, and those that may.

The saved config is the truth: the latest checkpoint's config.json, or, before the first checkpoint, the run's
config.yaml (written once when the run starts, never rewritten). When a run continues, a setting given on the
command line must equal the saved one unless it may change (`MAY_CHANGE`, as each option declares in
`sae_dist/config.py`: how long to train, how often to log and checkpoint, where and on how many ranks); an
accepted change is recorded in the run's resume history. A setting not given keeps its saved value, so
`trainer.out_dir=RUN` alone continues RUN exactly as it was defined.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from sae_dist.config import RENAMED_OPTIONS, ConfigError, RunConfig, options_where, resolve_dtype, resume_mode
from sae_dist.option_facts import CHANGEABLE, PER_COMMAND
from sae_dist.run_dir import flat_settings, latest_checkpoint, read_checkpoint_config, read_run_config
from sae_dist.train.preflight import check_device
from sae_dist.validation import from_dict

MAY_CHANGE = options_where(lambda facts: facts.on_resume == CHANGEABLE)
"""Settings a continued run may change, as each option declares (`sae_dist.option_facts.option`): none changes what the
SAE learns from which data (the world size, not a setting, may change too)."""

DTYPE_SETTINGS = ("model.dtype", "trainer.dtype")
"""Compared as the dtypes they resolve to on this run's device: a run saved with float32 before 'auto' was the
default continues under 'auto' on a CPU, where 'auto' means float32, and keeps its saved value."""

THIS_INVOCATION = options_where(lambda facts: facts.on_resume == PER_COMMAND)
"""How this command found the run (trainer.out_dir, trainer.resume): always taken from the command, never compared."""


class RunDirectoryError(ConfigError):
    """trainer.out_dir holds something that trainer.resume or the run's identity forbids using."""


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        section, _, key = path.rpartition(".")
        (nested.setdefault(section, {}) if section else nested)[key] = value
    return nested


def explicit_settings(overrides: list[str]) -> set[str]:
    """The settings a Hydra command line names: 'sae.k' for `sae.k=16`, 'sae' for a group choice `sae=topk`, and ''
    (everything) for a choice that may set any key, like `+experiment=switch_65k`; a renamed option by its new name.
    Hydra's own keys are ignored."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sections = {f.name for f in fields(RunConfig)}
    named = set()
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key.split(".")[0] == "hydra":
            continue
        named.add(RENAMED_OPTIONS.get(key, key) if key.split(".")[0] in sections else "")
    return named


def _given(path: str, named: set[str] | None) -> bool:
    return named is None or any(key in ("", path) or path.startswith(key + ".") for key in named)


def _show(value: Any) -> str:
    return "null" if value is None else json.dumps(value) if isinstance(value, str) else str(value)


def _same_setting(path: str, saved: Any, value: Any, current: RunConfig) -> bool:
    """Whether a setting given on a continuing command equals the saved one (see `DTYPE_SETTINGS`)."""
    if path in DTYPE_SETTINGS and saved is not None:
        device_type = check_device(current.trainer.device).type
        return resolve_dtype(saved, device_type) == resolve_dtype(value, device_type)
    return value == saved


def continue_config(
    saved: RunConfig, current: RunConfig, overrides: list[str] | None = None
) -> tuple[RunConfig, dict[str, list]]:
    """The config a continued run uses, and the accepted changes {setting: [saved, new]}.

    `overrides` are the command line's Hydra overrides (only settings they name are compared; the others keep their
    saved values); None compares every setting (a config built in Python). A difference outside `MAY_CHANGE` raises
    RunDirectoryError listing every such difference."""
    named = explicit_settings(overrides) if overrides is not None else None
    old, new = flat_settings(saved), flat_settings(current)
    merged, changes, refused = dict(old), {}, []
    for path, value in new.items():
        if path in THIS_INVOCATION:
            merged[path] = value
        elif _given(path, named) and not _same_setting(path, old.get(path), value, current):
            if path in MAY_CHANGE:
                merged[path], changes[path] = value, [old.get(path), value]
            else:
                refused.append(f"{path} {_show(old.get(path))} -> {_show(value)}")
    if refused:
        raise RunDirectoryError(
            f"trainer.out_dir={current.trainer.out_dir} holds a run defined otherwise: {', '.join(refused)}; "
            "a continued run keeps its settings (only steps, logging, checkpointing, device, on_nonfinite, "
            "engine, ep_size, timeout_s, the data path's speed settings, W&B and the number of ranks may change): "
            "drop these overrides, or choose another trainer.out_dir for a new run"
        )
    return from_dict(_unflatten(merged)), changes


def saved_config(run_dir: str | Path) -> RunConfig | None:
    """The run's config as saved: its latest checkpoint's, else its config.yaml's, else None (a new folder)."""
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        return read_checkpoint_config(latest)[0]
    try:
        return read_run_config(run_dir)
    except ConfigError as exc:  # the folder belongs to something else
        raise RunDirectoryError(f"trainer.out_dir={run_dir}: {exc}") from None


def checkpoint_to_resume(run: RunConfig, run_dir: str | Path) -> Path | None:
    """The checkpoint the run continues from under trainer.resume (None: it starts at step 0), or
    RunDirectoryError when trainer.resume forbids what the folder holds."""
    mode = resume_mode(run.trainer)
    latest = latest_checkpoint(run_dir)
    if latest is None:
        if mode == "true":
            raise RunDirectoryError(
                f"trainer.resume=true but trainer.out_dir={run_dir} holds no checkpoint to continue; "
                "use trainer.resume=auto to start it"
            )
        return None
    if mode == "false":
        raise RunDirectoryError(
            f"trainer.out_dir={run_dir} already holds checkpoints (latest {latest.name}); use trainer.resume=auto "
            "to continue that run, or choose another trainer.out_dir"
        )
    return latest
