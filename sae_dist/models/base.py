"""The SAE contract: what every architecture provides, and the registry that maps `sae.kind` to its class.

An architecture is one module holding a subclass of `SAE` decorated with `@register("<kind>")`, imported by
`sae_dist/models/__init__.py`. Everything above the models (config validation, the parallel layout, the trainer,
loading and export) asks the registry and the class, never compares `kind` strings.

Every SAE, built as `cls(cfg, d_model, seed, dispatcher)` (d_model: the input width d_in):
- `split_batch(rows_TC) -> (x_TD, y_TO)`: a source's rows as input and target (docs/math.md section 9: [x | y] for a
  transcoder, `sae.d_out` set; for an SAE y is x, the same tensor);
- `forward(x_TD, aux_candidates=None) -> SAEOutput` (AuxK, where the SAE has it, over this step's dead-latent
  candidates); `encode(x_TD) -> Latents` (token order, global latent ids) and `decode(Latents, x_TD=None)` (x only
  for a skip transcoder's skip term);
- `in_place_weight_grads(enabled)`: a context in which the forward's graphs write weight gradients straight into
  `.grad` where the expert compute can (the trainer's step; off for `torch.autograd.grad` and gradient hooks);
- `loss_terms(y_TO, out, reducer)` against the target (unweighted, 'rec' counts once) and
  `loss_weights(step_fraction)`;
- `fired_latents(out)` (bool [local latents]), `active_latents(out)` (the L0 sum over local rows);
- `decoder_weights()` (unit-norm rows, renormalised each step), `bias_parameters()` (geometric-median init: of
  the targets for the names in `TARGET_BIASES`, of the inputs otherwise); `input_bias` and `output_bias` (b_pre
  both for an SAE; b_in and b_out for a transcoder) and `w_skip` (None but for a skip transcoder);
- `expert_sharded()`: the state-dict entries whose dim 0 splits over the expert-parallel group (their gradients are
  summed over the expert's replicas, checkpoints store them by global expert id); everything else is replicated;
- `after_step(out, reducer, applied)`: state updated from a step's output (e.g. BatchTopK's threshold);
- where `resamples_latents`: `latent_parameters()` and `reinit_latents_(...)`, what dead-latent resampling rewrites
  (`sae_dist/train/resample.py`);
- `saelens_state()`: its SAELens architecture name, config entries and weights (`sae_dist/interop/saelens.py`);
- where `folds_input_scale`: `fold_input_scale_(s_x, s_y)`, which makes a model trained on s_x x (a transcoder: to
  reconstruct s_y y) take raw x and return raw units (data.normalize_activations; `load_sae` calls it), through
  `_fold_encoder_`;
- the SAELens-style views `W_enc [d_in, L]`, `W_dec [L, d_out]`, `b_enc [L]`, `b_dec [d_out]`, `d_in`, `d_out`,
  `d_sae`.
Class-level facts, read before a model exists: `routed` (a router sends each token to experts; experts shard over
ranks; a capacity factor applies), `uses_k`, `rows_independent`, `check_config(cfg)` and `default_lr(cfg)`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_dist.config import ConfigError, SAEConfig
from sae_dist.flops import FlopsPerToken
from sae_dist.models.losses import BatchReducer

if TYPE_CHECKING:
    from sae_dist.models.auxk import AuxCandidates
    from sae_dist.models.routing import DispatchPlan, Routing, TokenDispatcher


TARGET_BIASES = frozenset({"b_out"})
"""The biases initialised from the targets y (the geometric median of the first batch's y); the others from x."""


class SAEOutput(NamedTuple):
    x_hat_TD: Tensor
    """The reconstruction of the target, [T, d_out] float32 (y_hat; x_hat for an SAE)."""
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
        """The input width d_in."""
        self.transcoder = cfg.d_out is not None
        """The target is another site than the input (docs/math.md section 9)."""
        self.d_out = cfg.d_out if self.transcoder else d_model
        self.w_skip: nn.Parameter | None = None

    def _add_biases(self) -> None:
        """b_pre (an SAE), or b_in, b_out and, with `sae.skip`, W_skip [d_out, d_in] at zero (a transcoder)."""
        if not self.transcoder:
            self.b_pre = nn.Parameter(torch.zeros(self.d_model))
            return
        self.b_in = nn.Parameter(torch.zeros(self.d_model))
        self.b_out = nn.Parameter(torch.zeros(self.d_out))
        if self.cfg.skip:
            self.w_skip = nn.Parameter(torch.zeros(self.d_out, self.d_model))

    @property
    def input_bias(self) -> Tensor:
        """Subtracted from x before the encoders: b_in (b_pre for an SAE)."""
        return self.b_in if self.transcoder else self.b_pre

    @property
    def output_bias(self) -> Tensor:
        """Added to the reconstruction: b_out (b_pre for an SAE)."""
        return self.b_out if self.transcoder else self.b_pre

    def split_batch(self, rows_TC: Tensor) -> tuple[Tensor, Tensor]:
        """(x [T, d_in], y [T, d_out]) of a source's rows: [x | y] for a transcoder; (rows, rows) for an SAE."""
        if not self.transcoder:
            return rows_TC, rows_TC
        if rows_TC.shape[-1] != self.d_model + self.d_out:
            raise ValueError(f"rows of width {rows_TC.shape[-1]} are not [x | y] of widths {self.d_model} + "
                             f"{self.d_out}")
        return rows_TC[:, : self.d_model], rows_TC[:, self.d_model :]

    def reconstruct(self, decoded_TO: Tensor, x_TD: Tensor) -> Tensor:
        """y_hat = decoded + b_out [+ W_skip x], float32 [T, d_out]; x_hat = decoded + b_pre for an SAE."""
        y_hat_TO = decoded_TO + self.output_bias.float()
        if self.w_skip is not None:
            y_hat_TO = y_hat_TO + F.linear(x_TD, self.w_skip).float()
        return y_hat_TO

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
        routing every expert term counts e times (each token is e rows). A transcoder's decoder terms are d_out
        wide; its skip GEMM adds `skip_flops_per_token`."""
        d, n, k, e = d_model, cfg.num_experts, cfg.k, cfg.experts_per_token
        d_out = cfg.d_out or d
        width = cfg.num_latents // n  # the latents a token's encoder actually computes
        router = 2 * n * d + n if cls.routed else 0  # GEMM + softmax
        skip_forward, skip_backward = skip_flops_per_token(cfg, d_model)
        forward = router + e * (2 * width * d + width + 2 * k * d_out) + skip_forward
        # input and weight gradients of encoder and decoder rows
        backward = 2 * router + e * (4 * k * d + 4 * k * d_out) + skip_backward
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
    def loss_terms(self, y_TO: Tensor, out: SAEOutput, reducer: BatchReducer | None = None) -> dict[str, Tensor]:
        """Unweighted loss terms against the target `y_TO` (`split_batch`; x for an SAE); `reducer` makes batch
        statistics global under data or expert parallelism."""

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
    def decode(self, latents: Latents, x_TD: Tensor | None = None) -> Tensor:
        """x_hat [T, d_out] from `encode`'s latents; a skip transcoder needs the input `x_TD` for its skip term."""

    @abstractmethod
    def decoder_weights(self) -> list[nn.Parameter]:
        """Parameters whose last-dim rows are unit-norm decoder directions."""

    @abstractmethod
    def bias_parameters(self) -> dict[str, nn.Parameter]:
        """Biases initialised to the geometric median of the first batch (docs/math.md sections 3 and 9): of its targets
        for the names in `TARGET_BIASES`, of its inputs otherwise."""

    def expert_sharded(self) -> frozenset[str]:
        """State-dict entries split over the expert-parallel group along dim 0 (none: everything replicated)."""
        return frozenset()

    def after_step(self, out: SAEOutput, reducer: BatchReducer | None, applied: Tensor) -> None:  # noqa: B027
        """State that follows a training step's output; `applied` (0-dim bool) is False for a skipped step."""

    @torch.no_grad()
    def fold_input_scale_(self, scale: float, target_scale: float | None = None) -> None:
        """Rewrite the weights of a model trained on inputs s_x x (s_x = `scale`) and targets s_y y (s_y =
        `target_scale`; None: s_x, an SAE's one scale) so that on raw x it gives the trained model's latents and
        reconstruction divided by s_y (docs/math.md section 10): the input centring (and the router's) divided by
        s_x, router weights times s_x; encoder weights and W_skip times s_x / s_y; encoder biases, thresholds and
        b_out divided by s_y; the unit-norm decoder rows kept. With s_x = s_y the encoder weights are kept (an
        exact factor 1). Where `folds_input_scale`; ValueError for an SAE given two different scales."""
        if not self.folds_input_scale:
            raise NotImplementedError(f"sae.kind={self.kind!r} cannot fold an input scale")
        target_scale = scale if target_scale is None else target_scale
        if not self.transcoder and target_scale != scale:
            raise ValueError(f"target_scale={target_scale}: an SAE's target is its input, of scale {scale}; only a "
                             "transcoder (sae.d_out) has a target scale of its own")
        self.input_bias.div_(scale)
        if self.transcoder:  # an SAE's b_pre is its output bias too, divided once above
            self.output_bias.div_(target_scale)
        if self.w_skip is not None:
            self.w_skip.mul_(scale / target_scale)
        self._fold_encoder_(scale, target_scale)

    def _fold_encoder_(self, scale: float, target_scale: float) -> None:
        """The architecture's part of `fold_input_scale_`: encoder weights times s_x / s_y (s_x = `scale`, s_y =
        `target_scale`), encoder biases and thresholds divided by s_y, router weights times s_x and its centring
        divided by s_x, so that every pre-activation is the trained one divided by s_y and every router logit the
        trained one."""
        raise NotImplementedError(f"sae.kind={self.kind!r} cannot fold an input scale")

    def saelens_state(self) -> tuple[str, dict, dict[str, Tensor]]:
        """(SAELens architecture, its config entries beyond d_in/d_sae, its weights) of a model holding every
        expert; NotImplementedError for an architecture without a SAELens form."""
        raise NotImplementedError(f"sae.kind={self.kind!r} has no SAELens format")

    def saelens_transcoder(self, architecture: str, weights: dict[str, Tensor]) -> tuple[str, dict, dict[str, Tensor]]:
        """A transcoder as SAELens's `architecture` ('transcoder', 'jumprelu_transcoder'; their skip forms with
        W_skip): SAELens's transcoders do not centre their input, so b_in folds into the encoder bias,
        b_enc - b_in W_enc, and b_dec is b_out. `weights`: W_enc [d_in, L], b_enc [L], W_dec [L, d_out], and any
        other entry of the architecture (a threshold)."""
        weights = {**weights, "b_enc": weights["b_enc"] - self.b_in @ weights["W_enc"], "b_dec": self.b_out}
        if self.w_skip is not None:
            architecture = architecture.replace("transcoder", "skip_transcoder")
            weights["W_skip"] = self.w_skip
        return architecture, {"d_out": self.d_out, "apply_b_dec_to_input": False}, weights

    # --- SAELens-style views (the local latents) ---------------------------------------------------------------
    @property
    @abstractmethod
    def W_enc(self) -> Tensor:  # noqa: N802 (SAELens's names)
        """[d_in, L] encoder, a view of the parameter."""

    @property
    @abstractmethod
    def W_dec(self) -> Tensor:  # noqa: N802
        """[L, d_out] decoder rows, a view of the parameter."""

    @property
    def b_dec(self) -> Tensor:
        """The decoder bias [d_out]: b_pre (also subtracted before encoding) for an SAE, b_out for a transcoder."""
        return self.output_bias

    @property
    def d_in(self) -> int:
        return self.d_model

    @property
    def d_sae(self) -> int:
        return self.cfg.num_latents


def input_width(cfg: SAEConfig, row_width: int) -> int:
    """d_in of an SAE on source rows `row_width` wide: the rows less a transcoder's target, [x | y]."""
    if cfg.d_out is None:
        return row_width
    if row_width <= cfg.d_out:
        raise ConfigError(f"sae.d_out={cfg.d_out}: the source's rows are {row_width} wide, which leaves no input x "
                          "beside the target y")
    return row_width - cfg.d_out


def skip_input(sae: SAE, x_TD: Tensor | None) -> Tensor | None:
    """`x_TD` for `SAE.reconstruct` in a `decode`: a skip transcoder's reconstruction needs it."""
    if sae.w_skip is not None and x_TD is None:
        raise ValueError("a skip transcoder's reconstruction adds W_skip x: pass the input, decode(latents, x_TD)")
    return x_TD


def skip_flops_per_token(cfg: SAEConfig, d_in: int) -> tuple[int, int]:
    """(forward, backward) FLOPs per token of a skip transcoder's W_skip x: 2 d_in d_out, and twice that for the
    input and weight gradients; (0, 0) without a skip."""
    if not cfg.skip:
        return 0, 0
    return 2 * d_in * cfg.d_out, 4 * d_in * cfg.d_out


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


