"""Trained runs as points of the comparison plots: where each point's numbers come from, which runs one line joins,
and the words that name a line or a figure.

A run folder contributes one `RunPoint`: its config (config.yaml), d (the checkpoint's config.json), and its final
metrics, from `eval.json` in the latest checkpoint folder when present (held-out evaluation), else from the last
row of metrics.jsonl (training batches).

A plot joins runs into one line only when they differ in nothing but the settings its x-axis sweeps (`sweeps`):
k and the L1 coefficient for the MSE-vs-L0 frontier; width, length, batch and learning rate for the scaling plot.
Runs that differ in anything else that changes what an SAE learns (N, the data, the seed, ...) get lines of their
own, labelled by the settings that differ between lines; the settings all runs share go into the title. Runs are
also named by family, by comparison with the dense runs beside them: a Switch SAE whose experts are each as wide
as a dense SAE is FLOP-matched to it, one whose total width equals a dense SAE's is width-matched.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_dist.config import RunConfig, options_where
from sae_dist.models import architecture
from sae_dist.run_dir import (
    EVAL_FILE,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    NotARunError,
    find_report,
    flat_settings,
    latest_checkpoint,
    read_checkpoint_config,
    read_metrics,
    read_run_config,
)

NOT_COMPARED = set(options_where(lambda facts: not facts.changes_math))
"""Settings that do not change what an SAE learns (where it ran, how often it logged), as each option declares
(`sae_dist.option_facts.option`): never split a line."""
SHORT_NAMES = {
    "sae.kind": "kind", "sae.num_experts": "N", "sae.num_latents": "M", "sae.k": "k", "trainer.steps": "steps",
    "trainer.batch_size": "batch", "trainer.lr": "lr", "data.source": "data", "model.name": "model",
    "model.layer": "layer", "data.dataset": "dataset", "data.d_model": "d", "sae.lb_alpha": "alpha",
    "sae.l1_coefficient": "l1", "trainer.seed": "seed", "parallel.capacity_factor": "capacity",
}
"""Short names of settings in labels and titles, the most telling first."""
LABEL_SETTINGS = 4
"""A line's label names at most this many of the settings that tell it apart (the most telling first)."""
TITLE_SETTINGS = ("data.source", "model.name", "model.layer", "data.dataset", "trainer.steps", "trainer.batch_size")
"""The shared settings a figure's title names (when all runs share them), in this order."""


@dataclass
class RunPoint:
    """One trained SAE as a point of the frontier and scaling plots."""

    name: str
    run: RunConfig
    d_model: int
    tokens: int
    """Training tokens."""
    mse: float
    """Sum over dims, mean over tokens (the paper's unit)."""
    fvu: float
    l0: float


def _eval_metrics(report: dict[str, Any]) -> dict[str, float]:
    """mse / fvu / l0 of an eval.json written by launch/evaluate.py (its 'reconstruction' section)."""
    section = report["reconstruction"]
    return {key: float(section[key]) for key in ("mse", "fvu", "l0")}


def load_run_point(run_dir: str | Path) -> RunPoint:
    """The RunPoint of a run folder (see the module docstring); NotARunError without a config or metrics."""
    run_dir = Path(run_dir)
    run = read_run_config(run_dir)
    if run is None:
        raise NotARunError(f"{run_dir} is not a run folder: it has no {RUN_CONFIG_FILE}")
    checkpoint = latest_checkpoint(run_dir)
    d_model = read_checkpoint_config(checkpoint)[1] if checkpoint is not None else run.data.d_model
    rows = [row for row in read_metrics(run_dir) if "mse" in row]
    if not rows:
        raise NotARunError(f"{run_dir} has no logged metrics ({METRICS_FILE} rows with 'mse')")
    metrics = {key: float(rows[-1].get(key, float("nan"))) for key in ("mse", "fvu", "l0")}
    eval_path = find_report(run_dir, EVAL_FILE)
    if eval_path is not None:
        metrics = _eval_metrics(json.loads(eval_path.read_text()))
    return RunPoint(run_dir.name, run, d_model, int(rows[-1]["tokens"]), **metrics)


def run_family(points: Sequence[RunPoint], point: RunPoint) -> str:
    """A dense architecture's label ('TopK', 'ReLU'), or a routed one's matched to the dense runs: 'Switch
    FLOP-matched' (each expert as wide as a dense run), 'Switch width-matched' (as wide in total) or 'Switch'."""
    sae = point.run.sae
    arch = architecture(sae.kind)
    if not arch.routed:
        return arch.label
    dense_widths = {p.run.sae.num_latents for p in points if not architecture(p.run.sae.kind).routed}
    if sae.num_latents // sae.num_experts in dense_widths:
        return f"{arch.label} FLOP-matched"
    if sae.num_latents in dense_widths:
        return f"{arch.label} width-matched"
    return arch.label


def settings(point: RunPoint) -> dict[str, Any]:
    """The settings of a run that change what it learns, by dotted name, with d (which the checkpoint knows)."""
    flat = {key: value for key, value in flat_settings(point.run).items() if key not in NOT_COMPARED}
    flat["data.d_model"] = point.d_model
    return flat


def show(key: str, value: Any) -> str:
    """'k=32', 'N=8', 'lr=0.0002', 'model=gpt2' for one setting."""
    if isinstance(value, float):
        value = f"{value:g}"
    elif isinstance(value, str):
        value = value.rsplit("/", 1)[-1]
    return f"{SHORT_NAMES.get(key, key.rsplit('.', 1)[-1])}={value}"


def _differing(groups: Sequence[dict[str, Any]]) -> list[str]:
    """The settings whose value is not the same in every group, in config order."""
    keys = list(dict.fromkeys(key for group in groups for key in group))
    return [key for key in keys if len({json.dumps(group.get(key)) for group in groups}) > 1]


@dataclass
class Series:
    """The runs one plot line joins, and its legend label."""

    label: str
    points: list[RunPoint]


def series(points: Sequence[RunPoint], sweeps: Collection[str], order: Callable[[RunPoint], float],
           by_family: bool = True) -> list[Series]:
    """Runs grouped into lines: equal in every compared setting except `sweeps` (and, with `by_family`, of one
    family), each line sorted by `order` and labelled by its family (else its architecture) and the settings that
    differ between the lines their architecture uses."""
    groups: dict[str, list[RunPoint]] = defaultdict(list)
    fixed: dict[str, dict[str, Any]] = {}
    for point in points:
        kept = {key: value for key, value in settings(point).items() if key not in sweeps}
        name = run_family(points, point) if by_family else architecture(point.run.sae.kind).label
        key = json.dumps([name, kept], sort_keys=True)
        groups[key].append(point)
        fixed[key] = {"name": name, **kept}
    lines = []
    for key, group in groups.items():
        differing = [setting for setting in fixed[key]
                     if setting not in ("name", "sae.kind") and _applies(setting, group[0])
                     and _differs(setting, [g for k, g in fixed.items() if _applies(setting, groups[k][0])])]
        differing.sort(key=lambda setting: list(SHORT_NAMES).index(setting) if setting in SHORT_NAMES else 99)
        described = [show(setting, fixed[key][setting]) for setting in differing[:LABEL_SETTINGS]]
        described += ["..."] if len(differing) > LABEL_SETTINGS else []
        lines.append(Series(" ".join([fixed[key]["name"], *described]), sorted(group, key=order)))
    labels = [line.label for line in lines]
    for line in lines:
        if labels.count(line.label) > 1:  # cut to the same words: the run folders tell them apart
            line.label += f" ({', '.join(p.name for p in line.points)})"
    return sorted(lines, key=lambda line: line.label)


def _differs(setting: str, groups: Sequence[dict[str, Any]]) -> bool:
    return setting in _differing(groups)


def _applies(key: str, point: RunPoint) -> bool:
    """Whether a setting means anything for the run's architecture and data (N for a dense SAE, l1 for a TopK one,
    the language model for synthetic activations do not)."""
    arch, source = architecture(point.run.sae.kind), point.run.data.source
    if key.startswith(("model.", "data.dataset", "data.data_files", "data.split", "data.text_column", "data.ctx_len",
                       "data.streaming")):
        return source == "lm"
    if key.startswith("data.synthetic_"):
        return source == "synthetic"
    if key == "data.cache_dir":
        return source == "cache"
    if key == "data.shuffle_buffer":
        return source != "synthetic"
    if key in ("sae.num_experts", "sae.lb_alpha", "parallel.capacity_factor"):
        return arch.routed
    if key.startswith("sae.l1_"):
        return not arch.uses_k  # the L1 penalty is the sparsity of architectures without k
    if key in ("sae.k", "sae.auxk_alpha", "sae.auxk_k", "sae.auxk_scale"):
        return arch.uses_k
    return True


def shared_title(points: Sequence[RunPoint], what: str) -> str:
    """'<what>: <the settings all runs share, of TITLE_SETTINGS>, d=<d>' (what a reader needs to place the plot)."""
    all_settings = [settings(p) for p in points]
    differing = set(_differing(all_settings))
    first = all_settings[0]
    keys = [key for key in TITLE_SETTINGS if key not in differing]
    if first["data.source"] != "lm":
        keys = [key for key in keys if not key.startswith(("model.", "data.dataset"))]
    keys += [] if "data.d_model" in differing else ["data.d_model"]
    return "\n".join([what, ", ".join(show(key, first[key]) for key in keys)]).strip()
