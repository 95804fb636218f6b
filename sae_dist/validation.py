"""Composed configs in, checked typed configs out: Hydra's or OmegaConf's config merged into the dataclasses of
`sae_dist/config.py` (unknown keys and wrong types fail there), then every value and the values that depend on each
other checked (`validate`), a sweep's members included. Every error is one line that names the bad value and what is
allowed.

This module sits below the models: the rules of each SAE kind come from the models' registry, which the package
hands to `use_architectures` when it is imported (`sae_dist/__init__.py`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from omegaconf import OmegaConf

from sae_dist.config import (
    AUXK_SCALES,
    DATA_SOURCES,
    DEAD_COUNTS,
    DTYPES,
    ENGINES,
    LR_RULES,
    MAX_SEED,
    NONFINITE_POLICIES,
    NORMALIZATIONS,
    RENAMED_OPTIONS,
    RESUME_MODES,
    SAMPLE_BY,
    SWEEP_KEYS,
    WANDB_MODES,
    ZERO_STAGES,
    CacheJobConfig,
    ConfigError,
    DataConfig,
    RunConfig,
    SAEConfig,
    TrainerConfig,
    as_dict,
    resume_mode,
)
from sae_dist.console import say
from sae_dist.site_names import hookpoint_label, hookpoint_parts, is_glob, site_label

PairExpander = Callable[[str, str | None], list[tuple[str, str | None]]]
"""`expand(hookpoint, target)`: the (model.hookpoint, model.target_hookpoint) pairs a sweep item's glob hookpoint,
and its target (None, one site or a glob), stand for in the model (`sae_dist.data.sites.expand_site_pairs`)."""


class ArchitectureFacts(Protocol):
    """An SAE kind's registered class (`sae_dist.models.base.SAE`) as validation and the layout read it; the FLOPs
    count (`sae_dist.flops`) reads its `flops_per_token` too."""

    routed: bool
    uses_k: bool
    rows_independent: bool
    folds_input_scale: bool

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None: ...



_lookup_architecture: Callable[[str], ArchitectureFacts] | None = None



def use_architectures(lookup: Callable[[str], ArchitectureFacts]) -> None:
    """Hand this module the models' registry: `lookup(kind)` is the registered class, or a ConfigError naming the
    registered kinds. The package does this once on import (`sae_dist/__init__.py`), so the ground floor asks the
    models about kinds without importing them."""
    global _lookup_architecture
    _lookup_architecture = lookup



def architecture_facts(kind: str) -> ArchitectureFacts:
    """The registered class of the SAE kind `kind` (see `use_architectures`)."""
    if _lookup_architecture is None:
        raise RuntimeError("no SAE registry: import the sae_dist package, which hands it to use_architectures")
    return _lookup_architecture(kind)



def _message_lines(exc: BaseException) -> list[str]:
    """The lines of an OmegaConf/Hydra message that matter: without OmegaConf's detail lines and Hydra's search
    path; a list of available options becomes 'allowed: a, b'."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "Config search path:" in lines:
        lines = lines[: lines.index("Config search path:")]
    lines = [line for line in lines if not line.startswith(("full_key:", "object_type=", "reference_type="))]
    for i, line in enumerate(lines):
        if line.startswith("Available options in"):
            allowed = f"allowed: {', '.join(lines[i + 1:])}"
            return [*lines[: i - 1], f"{lines[i - 1]}; {allowed}"] if i else [allowed]
    return lines



def error_line(exc: BaseException) -> str:
    """One line from an OmegaConf or Hydra error (and the OmegaConf error that caused it), naming the key."""
    text = " ".join(_message_lines(exc))
    cause = exc.__cause__
    if cause is not None and _message_lines(cause):
        key = getattr(cause, "full_key", None)
        detail = _message_lines(cause)[0]
        text = f"{text} ({key}: {detail})" if key else f"{text} ({detail})"
    return text or type(exc).__name__



def _typed(schema: type, cfg: Any) -> Any:
    """A Hydra/OmegaConf config merged into the dataclass `schema` (unknown keys and wrong types: ConfigError)."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        values.pop("hydra", None)
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
    except Exception as exc:  # omegaconf's errors carry the key and say what type was expected
        key = getattr(exc, "full_key", None)
        first_line = str(exc).splitlines()[0]
        raise ConfigError(f"{key}: {first_line}" if key else first_line) from None
    return OmegaConf.to_object(merged)



_RENAMES_NOTED: set[str] = set()
"""The old option names already noted in this process (a note once, however often configs are built)."""


def _old_names_given(cfg: Any) -> dict[str, Any]:
    """The renamed options (`RENAMED_OPTIONS`) the config gives under their old names, in its groups or in a sweep
    item (the groups read them as the new names'): old name -> the first value given."""
    values = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else dict(cfg)
    given = [{f"{group}.{key}": value for group, keys in values.items() if isinstance(keys, dict)
              for key, value in keys.items()}]
    given += [_dotted(dict(item)) for item in values.get("sweep") or [] if isinstance(item, dict)]
    found = {}
    for old in RENAMED_OPTIONS:
        value = next((options[old] for options in given if options.get(old) is not None), None)
        if value is not None:
            found[old] = value
    return found


def to_run_config(cfg: Any, note_renamed: bool = True) -> RunConfig:
    """Merge a Hydra/OmegaConf config into the typed schema and validate it. With `note_renamed` (a command line or
    a YAML file), a valid config that gives a renamed option under its old name gets one note line on stderr from
    rank 0, once per name and process; an invalid one gets its error alone, which says the rename where it names
    the new name."""
    old_names = _old_names_given(cfg) if note_renamed else {}
    run = _typed(RunConfig, cfg)
    try:
        validate(run)
    except ConfigError as exc:
        renamed = [f"{old} is renamed {RENAMED_OPTIONS[old]}" for old in old_names if RENAMED_OPTIONS[old] in str(exc)]
        if not renamed:
            raise
        raise ConfigError(f"{exc} ({'; '.join(renamed)})") from None
    for old, value in old_names.items():
        if old not in _RENAMES_NOTED and os.environ.get("RANK", "0") == "0":
            _RENAMES_NOTED.add(old)
            new = RENAMED_OPTIONS[old]
            say(f"note: {old} is renamed {new}; {old}={value} is read as {new}={value} until the next release")
    return run



def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)



def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"{name}={value!r} is unknown; allowed: {', '.join(allowed)}")



def _positive(name: str, value: float) -> None:
    _require(value > 0, f"{name}={value} must be positive")



def validate(run: RunConfig) -> None:
    """Check every value and the values that depend on each other; raise ConfigError with a one-line message.

    Normalises trainer.resume to lower case ('true' for a YAML/CLI boolean)."""
    model = run.model
    item = f"hookpoint: '{model.hookpoint}'"
    if model.target_hookpoint is not None:
        item += f", target_hookpoint: '{model.target_hookpoint}'"
    kind = "SAE" if model.target_hookpoint is None else "transcoder"
    members = f"one {kind} per {'block' if is_glob(model.target_hookpoint or '') else 'matching module'}"
    _require(model.hookpoint is None or not is_glob(model.hookpoint),
             f"model.hookpoint={model.hookpoint} is a glob: put it in a sweep item (sweep=[{{model: {{{item}}}}}]), "
             f"{members}")
    _require(model.target_hookpoint is None or not is_glob(model.target_hookpoint),
             f"model.target_hookpoint={model.target_hookpoint} is a glob: pair it with a glob model.hookpoint in a sweep "
             f"item (e.g. sweep=[{{model: {{hookpoint: 'mlp_in.*', target_hookpoint: 'mlp_out.*'}}}}]), {members}")
    _validate_run(run)



def _validate_run(run: RunConfig) -> None:
    """`validate` without refusing globs, which a sweep member checked before its item is expanded holds."""
    _validate_sae(run.sae)
    _validate_trainer(run.trainer)
    _validate_data(run.data)
    _require(run.sae.resample_every is None or run.trainer.engine == "torch",
             f"sae.resample_every={run.sae.resample_every} needs trainer.engine=torch (the DeepSpeed engine's "
             "partitioned Adam state is not reset)")
    _one_of("model.dtype", run.model.dtype, ("auto", *DTYPES))
    _require(run.model.layer >= 0, f"model.layer={run.model.layer} must be >= 0")
    if run.model.hookpoint is not None:
        hookpoint_parts(run.model.hookpoint)
    _require(bool(run.model.name) or bool(run.model.path), "model.name or model.path must be set")
    target = run.model.target_hookpoint
    if target is not None:
        hookpoint_parts(target)
    _require(target is None or run.sae.d_out is not None,
             f"model.target_hookpoint={target!r} makes a transcoder: set sae.d_out to the target's width")
    _require(run.data.source != "lm" or run.sae.d_out is None or target is not None or bool(run.sweep),
             f"sae.d_out={run.sae.d_out} makes a transcoder: with data.source=lm set model.target_hookpoint, the "
             "site it reconstructs")
    parallel = run.parallel
    cf = parallel.capacity_factor
    _require(cf is None or cf > 0, f"parallel.capacity_factor={cf} must be positive or null (dropless)")
    if cf is not None:
        _require(_architecture(run.sae).routed,
                 f"parallel.capacity_factor={cf} applies to Switch SAEs only, the kinds with a router "
                 f"(sae.kind={run.sae.kind!r}); use null")
    ep = parallel.ep_size
    _require(ep is None or ep > 0, f"parallel.ep_size={ep} must be positive or null")
    _require(parallel.timeout_s > 0, f"parallel.timeout_s={parallel.timeout_s} must be positive")
    _positive("parallel.a2a_chunks", parallel.a2a_chunks)
    _require(parallel.a2a_chunks == 1 or _architecture(run.sae).rows_independent,
             f"parallel.a2a_chunks={parallel.a2a_chunks}: sae.kind={run.sae.kind!r} selects over each expert's whole "
             "batch, which chunks would split; use 1")
    _require(parallel.a2a_chunks == 1 or not run.sae.union_topk,
             f"parallel.a2a_chunks={parallel.a2a_chunks}: sae.union_topk=true exchanges every row's candidates before "
             "it decodes, which the chunked all-to-all does not overlap; use 1")
    _require(run.data.normalize_activations == "none" or _architecture(run.sae).folds_input_scale,
             f"data.normalize_activations={run.data.normalize_activations!r}: sae.kind={run.sae.kind!r} cannot fold "
             "the input scale into its weights; use 'none'")
    if run.sweep:
        sweep_members(run)



def _architecture(sae: SAEConfig) -> ArchitectureFacts:
    return architecture_facts(sae.kind)



def _validate_sae(sae: SAEConfig) -> None:
    cls = _architecture(sae)
    _positive("sae.num_latents", sae.num_latents)
    _positive("sae.num_experts", sae.num_experts)
    _positive("sae.experts_per_token", sae.experts_per_token)
    _one_of("sae.encoder_backward_kernel", sae.encoder_backward_kernel, ("auto", "sparse", "gemm"))
    _one_of("sae.decoder_kernel", sae.decoder_kernel, ("auto", "gather", "gemm"))
    _require(
        sae.num_latents % sae.num_experts == 0,
        f"sae.num_latents={sae.num_latents} is not divisible by sae.num_experts={sae.num_experts}",
    )
    cls.check_config(sae)
    _require(sae.lb_alpha >= 0, f"sae.lb_alpha={sae.lb_alpha} must be >= 0")
    _require(sae.auxk_alpha is None or sae.auxk_alpha >= 0,
             f"sae.auxk_alpha={sae.auxk_alpha} must be >= 0 or null (the kind's default)")
    _require(sae.auxk_k is None or sae.auxk_k > 0, f"sae.auxk_k={sae.auxk_k} must be positive or null (d / 2)")
    _one_of("sae.auxk_scale", sae.auxk_scale, AUXK_SCALES)
    _require(sae.l1_coefficient >= 0, f"sae.l1_coefficient={sae.l1_coefficient} must be >= 0")
    _positive("sae.dead_tokens", sae.dead_tokens)
    _one_of("sae.dead_count", sae.dead_count, DEAD_COUNTS)
    if sae.dead_count == "routed":
        _require(cls.routed, f"sae.dead_count='routed' applies to routed SAEs only (sae.kind={sae.kind!r}); "
                             "use 'tokens'")
    every = sae.resample_every
    _require(every is None or every > 0, f"sae.resample_every={every} must be positive or null (never)")
    _require(sae.d_out is None or sae.d_out > 0, f"sae.d_out={sae.d_out} must be positive or null (an SAE)")
    _require(not sae.skip or sae.d_out is not None,
             "sae.skip=true is a transcoder's skip connection: it needs sae.d_out (the target width)")
    _require(0 <= sae.l1_warmup_frac <= 1, f"sae.l1_warmup_frac={sae.l1_warmup_frac} must be in [0, 1]")



def _validate_trainer(trainer: TrainerConfig) -> None:
    for name in ("batch_size", "steps", "grad_clip", "adam_eps", "log_every", "checkpoint_every", "keep_checkpoints"):
        _positive(f"trainer.{name}", getattr(trainer, name))
    _require(trainer.lr is None or trainer.lr > 0, f"trainer.lr={trainer.lr} must be positive or null")
    _one_of("trainer.lr_rule", trainer.lr_rule, LR_RULES)
    _require(0 <= trainer.lr_decay_frac <= 1, f"trainer.lr_decay_frac={trainer.lr_decay_frac} must be in [0, 1]")
    betas = list(trainer.adam_betas)
    _require(len(betas) == 2 and all(0 <= b < 1 for b in betas),
             f"trainer.adam_betas={betas} must be two values in [0, 1)")
    _require(0 <= trainer.seed <= MAX_SEED, f"trainer.seed={trainer.seed} must be in [0, 2^63 - 1]")
    _one_of("trainer.dtype", trainer.dtype, ("auto", *DTYPES))
    _one_of("trainer.device", trainer.device, ("auto", "cpu", "cuda"))
    _one_of("trainer.engine", trainer.engine, ENGINES)
    _one_of("trainer.optimizer_state", trainer.optimizer_state, ("float32", "bfloat16"))
    _require(trainer.optimizer_state == "float32" or trainer.engine == "torch",
             f"trainer.optimizer_state={trainer.optimizer_state!r} needs trainer.engine=torch (DeepSpeed keeps "
             "float32 moments)")
    _require(trainer.zero_stage in ZERO_STAGES, f"trainer.zero_stage={trainer.zero_stage} is unknown; allowed: 1, 2")
    _require(trainer.profile_steps >= 0,
             f"trainer.profile_steps={trainer.profile_steps} must be 0 (none) or positive")
    _require(bool(str(trainer.out_dir).strip()), "trainer.out_dir must not be empty")
    trainer.resume = resume_mode(trainer)
    _one_of("trainer.resume", trainer.resume, RESUME_MODES)
    _one_of("trainer.on_nonfinite", trainer.on_nonfinite, NONFINITE_POLICIES)
    _require(bool(trainer.wandb_project.strip()), "trainer.wandb_project must not be empty")
    if trainer.wandb_mode is not None:
        _one_of("trainer.wandb_mode", trainer.wandb_mode, WANDB_MODES)



def _validate_data(data: DataConfig) -> None:
    _one_of("data.source", data.source, DATA_SOURCES)
    _require(data.ctx_len > 1, f"data.ctx_len={data.ctx_len} must be > 1")
    _positive("data.lm_batch_size", data.lm_batch_size)
    _positive("data.shuffle_buffer", data.shuffle_buffer)
    if data.source == "cache":
        _require(bool(data.cache_dir), "data.cache_dir must be set when data.source='cache'")
    if data.source == "synthetic":
        _positive("data.d_model", data.d_model)
        _require(
            0 < data.synthetic_active <= data.synthetic_features,
            f"data.synthetic_active={data.synthetic_active} must be in [1, data.synthetic_features]",
        )
        _require(data.synthetic_noise >= 0, f"data.synthetic_noise={data.synthetic_noise} must be >= 0")
    _require(data.prefetch >= 0, f"data.prefetch={data.prefetch} must be >= 0")
    _one_of("data.sample_by", data.sample_by, SAMPLE_BY)
    _one_of("data.normalize_activations", data.normalize_activations, NORMALIZATIONS)
    workers = data.tokenizer_workers
    _require(workers is None or workers >= 0, f"data.tokenizer_workers={workers} must be >= 0 or null (auto)")
    _require(not (data.pretokenize and data.streaming),
             "data.pretokenize=true needs data.streaming=false (a streamed dataset is read in order, not by index)")



def _dotted(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'sae': {'k': 16}} and {'sae.k': 16} both as {'sae.k': 16}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat



def _expanded_items(run: RunConfig, expand: PairExpander | None) -> list[tuple[int, dict]]:
    """(item index, dotted overrides) of every sweep member: an item whose model.hookpoint is a glob becomes one
    member per (hookpoint, target) pair `expand` gives for it (without `expand`, the glob stays one member,
    checked for syntax)."""
    items = []
    for i, item in enumerate(run.sweep):
        overrides = _dotted(dict(item))
        hookpoint, target = overrides.get("model.hookpoint"), overrides.get("model.target_hookpoint")
        _require(target is None or not is_glob(target) or (hookpoint is not None and is_glob(hookpoint)),
                 f"sweep[{i}]: model.target_hookpoint={target} is a glob: pair it with a glob model.hookpoint in the "
                 "same item (one transcoder per block)")
        if hookpoint is not None and is_glob(hookpoint) and expand is not None:
            _require("name" not in overrides, f"sweep[{i}]: a glob model.hookpoint={hookpoint} makes several SAEs, "
                                              "which cannot share one name")
            try:
                pairs = expand(str(hookpoint), None if target is None else str(target))
            except ConfigError as exc:
                raise ConfigError(f"sweep[{i}]: {exc}") from None
            items += [(i, {**overrides, "model.hookpoint": one, **({} if target is None else
                                                                    {"model.target_hookpoint": other})})
                      for one, other in pairs]
        else:
            items.append((i, overrides))
    return items



def sweep_members(run: RunConfig, expand: PairExpander | None = None) -> list[RunConfig]:
    """The runs of `run.sweep`: this run with each item's overrides, each named by its item (default
    '<kind>_M<M>_N<N>_k<k>_<site>', site 'L<layer>' or the hookpoint, a transcoder's over data.source=lm
    '<hookpoint>_to_<target>') and written to trainer.out_dir/<name>. `expand(glob, target)` lists the
    (hookpoint, target) pairs a glob model.hookpoint, and a glob model.target_hookpoint beside it, stand for
    (`sae_dist.data.sites.expand_site_pairs` over the model's modules).

    Over data.source=lm each member reads its own sites of the one pass, so members may differ in sae.d_out (SAEs
    and transcoders in one sweep); another source holds one site's rows, [x] or [x | y], one width for all."""
    base = as_dict(run)
    base["sweep"] = []
    lm = run.data.source == "lm"
    members: list[RunConfig] = []
    for i, overrides in _expanded_items(run, expand):
        bad = [key for key in overrides if not (key.startswith("sae.") or key in SWEEP_KEYS)]
        _require(not bad, f"sweep[{i}].{bad[0] if bad else ''} cannot differ between the SAEs of one stream; "
                          f"a sweep item may set: sae.*, {', '.join(SWEEP_KEYS)}")
        merged = OmegaConf.create(base)
        for key, value in overrides.items():
            if key != "name":
                OmegaConf.update(merged, key, value, merge=True)
        try:
            member = _typed(RunConfig, merged)
            _validate_run(member)  # a glob not expanded (`validate`): checked for syntax
        except ConfigError as exc:
            raise ConfigError(f"sweep[{i}]: {exc}") from None
        sae, model = member.sae, member.model
        named = ("sae.kind", "sae.num_latents", "sae.num_experts", "sae.k", "model.layer", "model.hookpoint",
                 "model.target_hookpoint", "name")
        others = "".join(f"_{key.rsplit('.', 1)[1]}={value}" for key, value in overrides.items() if key not in named)
        site = site_label(model)
        if lm and model.target_hookpoint is not None:
            site += f"_to_{hookpoint_label(model.target_hookpoint)}"
        member.name = str(overrides.get("name", f"{sae.kind}_M{sae.num_latents}_N{sae.num_experts}_k{sae.k}"
                                                f"_{site}{others}"))
        member.trainer.out_dir = f"{run.trainer.out_dir}/{member.name}"
        members.append(member)
    names = [m.name for m in members]
    _require(len(set(names)) == len(names), f"sweep names must differ: {names}")
    if not lm:
        widths = [m.sae.d_out for m in members]
        _require(len(set(widths)) <= 1, f"sweep: sae.d_out={widths} must be one value: the SAEs share one stream of "
                                        f"rows [x | y] of data.source={run.data.source}")
        layers = sorted({m.model.layer for m in members} - {run.model.layer})
        _require(not layers, f"sweep: model.layer={layers[0] if layers else ''} needs data.source=lm (one site otherwise)")
        for option in ("hookpoint", "target_hookpoint"):
            sites = [key for key in dict.fromkeys(getattr(m.model, option) for m in members)
                     if key != getattr(run.model, option)]
            _require(not sites, f"sweep: model.{option}={sites[0] if sites else ''} needs data.source=lm "
                                "(one site otherwise)")
    return members



def from_dict(values: dict) -> RunConfig:
    """Rebuild a RunConfig from `as_dict` output (e.g. a checkpoint's config.json)."""
    return to_run_config(OmegaConf.create(values), note_renamed=False)



def to_cache_job_config(cfg: Any) -> CacheJobConfig:
    """Merge a Hydra config of `launch/cache_activations.py` into its schema and validate it."""
    job = _typed(CacheJobConfig, cfg)
    cache = job.cache
    _require(job.data.source == "lm", f"data.source={job.data.source!r}: a cache is written from data.source=lm")
    validate(RunConfig(model=replace(job.model, target_hookpoint=None), data=job.data))
    if job.model.target_hookpoint is not None:  # transcoder rows: the target's width comes from the model
        hookpoint_parts(job.model.target_hookpoint)
    _one_of("cache.dtype", cache.dtype, DTYPES)
    _one_of("cache.device", cache.device, ("auto", "cpu", "cuda"))
    _require(cache.num_tokens > 0, f"cache.num_tokens={cache.num_tokens} must be positive")
    _require(cache.shard_tokens > 0, f"cache.shard_tokens={cache.shard_tokens} must be positive")
    return job
