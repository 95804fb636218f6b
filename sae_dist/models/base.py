"""The SAE contract: what every architecture provides, and the registry that maps `sae.kind` to its class.

An architecture is one module holding a subclass of `SAE` decorated with `@register("<kind>")`, imported by
`sae_dist/models/__init__.py`. Everything above the models (config validation, the parallel layout, the trainer,
loading and export) asks the registry and the class, never compares `kind` strings.

Every SAE, built as `cls(cfg, d_model, seed, dispatcher)`:
- `forward(x_TD, aux_candidates=None) -> SAEOutput` (AuxK, where the SAE has it, over this step's dead-latent
  candidates); `encode(x_TD) -> Latents` (token order, global latent ids) and `decode(Latents)`;
- `in_place_weight_grads(enabled)`: a context in which the forward's graphs write weight gradients straight into
  `.grad` where the expert compute can (the trainer's step; off for `torch.autograd.grad` and gradient hooks);
- `loss_terms(x_TD, out, reducer)` (unweighted, 'rec' counts once) and `loss_weights(step_fraction)`;
- `fired_latents(out)` (bool [local latents]), `active_latents(out)` (the L0 sum over local rows);
- `decoder_weights()` (unit-norm rows, renormalised each step), `bias_parameters()` (geometric-median init);
- `expert_sharded()`: the state-dict entries whose dim 0 splits over the expert-parallel group (their gradients are
  summed over the expert's replicas, checkpoints store them by global expert id); everything else is replicated;
- `after_step(out, reducer, applied)`: state updated from a step's output (e.g. BatchTopK's threshold);
- where `resamples_latents`: `latent_parameters()` and `reinit_latents_(...)`, what dead-latent resampling rewrites
  (`sae_dist/train/resample.py`);
- `saelens_state()`: its SAELens architecture name, config entries and weights (`sae_dist/interop/saelens.py`);
- where `folds_input_scale`: `fold_input_scale_(s)`, which makes a model trained on s * x take and return raw x
  (data.normalize_activations; `load_sae` calls it);
- the SAELens-style views `W_enc [d_in, L]`, `W_dec [L, d_in]`, `b_enc [L]`, `b_dec [d_in]`, `d_in`, `d_sae`.
Class-level facts, read before a model exists: `routed` (a router sends each token to experts; experts shard over
ranks; a capacity factor applies), `uses_k`, `rows_independent`, `check_config(cfg)` and `default_lr(cfg)`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, ClassVar, NamedTuple

from torch import Tensor, nn

from sae_dist.config import ConfigError, SAEConfig
from sae_dist.flops import FlopsPerToken
from sae_dist.models.losses import BatchReducer

if TYPE_CHECKING:
    from sae_dist.models.auxk import AuxCandidates
    from sae_dist.models.dispatch import DispatchPlan, TokenDispatcher
    from sae_dist.models.router import Routing


class SAEOutput(NamedTuple):
    x_hat_TD: Tensor
    latent_values_RK: Tensor
    """z per dispatched row (before the gate; zero where sae.union_topk dropped a candidate); [T, M] dense for the
    ReLU SAE."""
    latent_indices_RK: Tensor | None
    """Flat local latent ids per dispatched row; None for the ReLU SAE."""
    routing: Routing | None
    aux_recon_TD: Tensor | None
    kept_T: Tensor | None = None
    """Rows that reached an expert (a dropped row, cut by a capacity limit, adds nothing to x_hat; a token with no
    row kept reconstructs as b_pre); None = all. One per token, or per (token, slot) [T * e] under top-e routing."""
    plan: DispatchPlan | None = None
    """The dispatch that made the rows (combine() with it returns per-row tensors to token order)."""


class Latents(NamedTuple):
    """Sparse latent activations in token order: f = p_{e*} * z and their global latent ids ([T, e * k] under
    top-e routing: each chosen expert's k, best expert first; [T, k] with sae.union_topk, largest first)."""

    values_TK: Tensor
    indices_TK: Tensor


class SAE(nn.Module, ABC):
    """The contract of the module docstring; subclasses set `kind` through `@register`."""

    kind: ClassVar[str]
    label: ClassVar[str]
    """The architecture's name in plots and tables ('Switch', 'TopK')."""
    routed: ClassVar[bool] = False
    """A router sends each token to experts, which shard over the expert-parallel group."""
    uses_k: ClassVar[bool] = True
    """`sae.k` sets the active latents per token."""
    rows_independent: ClassVar[bool] = True
    """An expert's output for a row does not depend on its other rows, so its rows may arrive in chunks
    (parallel.a2a_chunks > 1)."""
    resamples_latents: ClassVar[bool] = False
    """Dead latents can be given new weights (`sae.resample_every`): the model has `latent_parameters` and
    `reinit_latents_`."""
    folds_input_scale: ClassVar[bool] = False
    """`fold_input_scale_` exists: the SAE may train on normalised activations (data.normalize_activations)."""
    k_aux: int = 0
    """Latents of the AuxK reconstruction (0: AuxK off)."""

    def __init__(self, cfg: SAEConfig, d_model: int):
        super().__init__()
        self.cfg = cfg
        self.d_model = d_model

    # --- class-level facts -------------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Raise a one-line ConfigError for settings this architecture does not take."""
        if not cls.routed and cfg.num_experts != 1:
            raise ConfigError(f"sae.num_experts={cfg.num_experts} must be 1 for sae.kind={cfg.kind!r}")
        if not cls.routed and cfg.experts_per_token != 1:
            raise ConfigError(f"sae.experts_per_token={cfg.experts_per_token} must be 1 for sae.kind={cfg.kind!r}")
        if cfg.experts_per_token > cfg.num_experts:
            raise ConfigError(f"sae.experts_per_token={cfg.experts_per_token} must be in [1, sae.num_experts="
                              f"{cfg.num_experts}]")
        if cfg.resample_every is not None and not cls.resamples_latents:
            raise ConfigError(f"sae.resample_every={cfg.resample_every}: sae.kind={cfg.kind!r} has no dead-latent "
                              "resampling; use null")
        if cfg.union_topk and cfg.experts_per_token == 1:
            raise ConfigError("sae.union_topk=true selects over the union of a token's experts: it needs "
                              "sae.experts_per_token > 1 (a Switch SAE); use false")
        per_expert = cfg.num_latents // cfg.num_experts
        if cls.uses_k and not 0 < cfg.k <= per_expert:
            raise ConfigError(f"sae.k={cfg.k} must be in [1, M/N={per_expert}]")

    @classmethod
    def default_lr(cls, cfg: SAEConfig, rule: str = "total") -> float:
        """The paper's rule for TopK-style SAEs, 2e-4 / sqrt(M / 2^14) ('total'), or with one expert's width M / N
        in place of M ('expert'; trainer.lr_rule)."""
        width = cfg.num_latents if rule == "total" else cfg.num_latents // cfg.num_experts
        return 2e-4 / math.sqrt(width / 2**14)

    @classmethod
    def flops_per_token(cls, cfg: SAEConfig, d_model: int) -> FlopsPerToken:
        """One training step's FLOPs per token (`sae_dist.flops`), for TopK-style experts: the router (routed
        kinds), the encoder GEMM over the chosen expert's M/N latents, a selection pass over them, the sparse decode
        of k rows; backward: the router GEMM twice, encoder and decoder sparse over the k active rows. Under top-e
        routing every expert term counts e times (each token is e rows)."""
        d, n, k, e = d_model, cfg.num_experts, cfg.k, cfg.experts_per_token
        width = cfg.num_latents // n  # the latents a token's encoder actually computes
        router = 2 * n * d + n if cls.routed else 0  # GEMM + softmax
        forward = router + e * (2 * width * d + width + 2 * k * d)
        backward = 2 * router + e * (4 * k * d + 4 * k * d)  # input and weight gradients of encoder and decoder rows
        return FlopsPerToken(encoder_paper=e * 4 * width * d, forward=forward, backward=backward)

    # --- the model ---------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def num_local_latents(self) -> int:
        """Latents held by this process (all M unless experts are sharded over ranks)."""

    @property
    def num_local_experts(self) -> int:
        return 1

    @abstractmethod
    def forward(self, x_TD: Tensor, aux_candidates: AuxCandidates | None = None) -> SAEOutput:
        """The model on tokens x_TD [T, d]; AuxK (where the SAE has it and it is on) selects among
        `aux_candidates`, the dead latents of this step (`auxk.py`), and does not run without them."""

    def in_place_weight_grads(self, enabled: bool) -> AbstractContextManager[None]:
        """A context whose forwards' graphs write weight gradients straight into `.grad` (where `.grad` is None,
        into a buffer the model keeps, overwritten; else added to) if `enabled`, sparing autograd a fresh
        gradient and its accumulation; nothing changes for an SAE without such an expert compute."""
        return nullcontext()

    @abstractmethod
    def loss_terms(self, x_TD: Tensor, out: SAEOutput, reducer: BatchReducer | None = None) -> dict[str, Tensor]:
        """Unweighted loss terms; `reducer` makes batch statistics global under data or expert parallelism."""

    @abstractmethod
    def loss_weights(self, step_fraction: float) -> dict[str, float]:
        """Weight of each term after `step_fraction` of training; terms without a weight count once."""

    @abstractmethod
    def fired_latents(self, out: SAEOutput) -> Tensor:
        """Bool [local latents] of latents that fired in this batch."""

    def active_latents(self, out: SAEOutput) -> Tensor:
        """Number of (row, latent) pairs with a positive activation (sum of L0 over local rows)."""
        return (out.latent_values_RK > 0).sum()

    @abstractmethod
    def encode(self, x_TD: Tensor) -> Latents:
        """Latent activations in token order, with global latent ids."""

    @abstractmethod
    def decode(self, latents: Latents) -> Tensor:
        """x_hat [T, d] from `encode`'s latents."""

    @abstractmethod
    def decoder_weights(self) -> list[nn.Parameter]:
        """Parameters whose last-dim rows are unit-norm decoder directions."""

    @abstractmethod
    def bias_parameters(self) -> dict[str, nn.Parameter]:
        """Biases initialised to the geometric median of the first batch (SPEC section 3)."""

    def expert_sharded(self) -> frozenset[str]:
        """State-dict entries split over the expert-parallel group along dim 0 (none: everything replicated)."""
        return frozenset()

    def after_step(self, out: SAEOutput, reducer: BatchReducer | None, applied: Tensor) -> None:  # noqa: B027
        """State that follows a training step's output; `applied` (0-dim bool) is False for a skipped step."""

    def fold_input_scale_(self, scale: float) -> None:
        """Rewrite the weights of a model trained on inputs s x (s = `scale`) so that on raw x it gives the trained
        model's latents and reconstruction divided by s (docs/math.md, 'Activation normalisation'): biases in the
        input space, encoder biases and thresholds divided by s, router weights multiplied by s; the unit-norm
        decoder rows and the encoder weights are kept. Where `folds_input_scale`."""
        raise NotImplementedError(f"sae.kind={self.kind!r} cannot fold an input scale")

    def saelens_state(self) -> tuple[str, dict, dict[str, Tensor]]:
        """(SAELens architecture, its config entries beyond d_in/d_sae, its weights) of a model holding every
        expert; NotImplementedError for an architecture without a SAELens form."""
        raise NotImplementedError(f"sae.kind={self.kind!r} has no SAELens format")

    # --- SAELens-style views (the local latents) ---------------------------------------------------------------
    @property
    @abstractmethod
    def W_enc(self) -> Tensor:  # noqa: N802 (SAELens's names)
        """[d_in, L] encoder, a view of the parameter."""

    @property
    @abstractmethod
    def W_dec(self) -> Tensor:  # noqa: N802
        """[L, d_in] decoder rows, a view of the parameter."""

    @property
    def b_dec(self) -> Tensor:
        """The decoder bias b_pre [d_in] (subtracted before encoding)."""
        return self.b_pre

    @property
    def d_in(self) -> int:
        return self.d_model

    @property
    def d_sae(self) -> int:
        return self.cfg.num_latents


_ARCHITECTURES: dict[str, type[SAE]] = {}


def register(kind: str) -> Callable[[type[SAE]], type[SAE]]:
    """Class decorator: `sae.kind=<kind>` builds this class."""

    def add(cls: type[SAE]) -> type[SAE]:
        if kind in _ARCHITECTURES:
            raise ValueError(f"sae.kind={kind!r} is registered twice ({_ARCHITECTURES[kind].__name__}, {cls.__name__})")
        cls.kind = kind
        _ARCHITECTURES[kind] = cls
        return cls

    return add


def architecture_names() -> tuple[str, ...]:
    return tuple(_ARCHITECTURES)


def architecture(kind: str) -> type[SAE]:
    """The class registered as `kind`; a one-line ConfigError naming the registered kinds otherwise."""
    try:
        return _ARCHITECTURES[kind]
    except KeyError:
        raise ConfigError(f"sae.kind={kind!r} is unknown; allowed: {', '.join(_ARCHITECTURES)}") from None


def build_sae(cfg: SAEConfig, d_model: int, seed: int, dispatcher: TokenDispatcher | None = None) -> SAE:
    """The SAE of `cfg.kind`; `dispatcher` (routed kinds) decides which experts live here and how tokens arrive."""
    return architecture(cfg.kind)(cfg, d_model, seed, dispatcher)


def default_lr(cfg: SAEConfig, rule: str = "total") -> float:
    """The learning rate of `cfg`'s architecture when trainer.lr is null, by trainer.lr_rule `rule`."""
    return architecture(cfg.kind).default_lr(cfg, rule)


def is_expert_sharded(model: nn.Module, name: str) -> bool:
    """Whether state-dict entry `name` of `model` splits over the expert-parallel group (see `SAE.expert_sharded`)."""
    return isinstance(model, SAE) and name in model.expert_sharded()


