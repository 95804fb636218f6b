"""The Switch SAE and the Switch transcoder as SAELens architectures (importing this module registers them):
'sae_dist_switch', and 'sae_dist_switch_transcoder' / 'sae_dist_switch_skip_transcoder'.

    import sae_dist.interop.saelens_switch  # noqa: F401
    from sae_lens import SAE
    sae = SAE.load_from_disk("exported/")           # written by launch/export.py --format saelens
    f = sae.encode(x)                                # [..., M], f = p_{e*} z as sae-dist's encode reports
    x_hat = sae.decode(f)                            # a transcoder: y_hat = sae(x), with the skip W_skip x

SAELens's layout: W_enc [d_in, M] (expert e owns columns e*M_e .. (e+1)*M_e - 1), W_dec [M, d_in], b_dec (b_pre);
plus W_router [N, d_in] and b_router [d_in], and for `activation` 'threshold' (BatchTopK experts) threshold [N].
The forward is docs/math.md section 2's, written densely (every expert's encoder on every token, then the chosen
expert's selection): simple, and slower than sae-dist's by the factor N.

The transcoders (docs/math.md section 9) are SAELens's `Transcoder` and `SkipTranscoder` with this routing and
selection: `d_out` in the config, W_dec [M, d_out], b_dec [d_out] (b_out), an encoder bias b_enc [M] that holds the
folded input centring b_enc - b_in W_enc (SAELens's transcoders do not centre their input), and for the skip form
W_skip [d_out, d_in], which the forward applies to the raw x and `decode` leaves out, as SAELens's does. A dense
TopK transcoder is the Switch transcoder with N = 1 behind a zero router: the softmax over one logit is exactly 1,
so one class covers both, exactly, where a TopK transcoder class would repeat the encoder and decoder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from sae_lens import SAE, SAEConfig, register_sae_class
from sae_lens.registry import SAE_CLASS_REGISTRY, get_sae_class
from sae_lens.saes.transcoder import SkipTranscoder, Transcoder, TranscoderConfig
from torch import nn

from sae_dist.models.expert_sae import SWITCH_ARCHITECTURE, SWITCH_TRANSCODER_ARCHITECTURE

ACTIVATIONS = ("topk", "threshold")
SWITCH_SKIP_TRANSCODER_ARCHITECTURE = SWITCH_TRANSCODER_ARCHITECTURE.replace("transcoder", "skip_transcoder")


@dataclass
class SwitchFields:
    """The Switch architectures' config entries beyond SAELens's (listed before SAELens's config class)."""

    k: int = 32
    """Active latents per token, inside the chosen expert."""
    num_experts: int = 8
    activation: str = "topk"
    """How the chosen expert selects its latents: 'topk' (its k largest) or 'threshold' (those above its
    threshold, the weight `threshold` [num_experts]: BatchTopK experts in eval mode)."""

    def __post_init__(self):
        super().__post_init__()
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is unknown; allowed: {', '.join(ACTIVATIONS)}")


@dataclass
class SwitchSAELensConfig(SwitchFields, SAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return SWITCH_ARCHITECTURE


@dataclass
class SwitchTranscoderSAELensConfig(SwitchFields, TranscoderConfig):
    @classmethod
    def architecture(cls) -> str:
        return SWITCH_TRANSCODER_ARCHITECTURE


@dataclass
class SwitchSkipTranscoderSAELensConfig(SwitchTranscoderSAELensConfig):
    @classmethod
    def architecture(cls) -> str:
        return SWITCH_SKIP_TRANSCODER_ARCHITECTURE


class SwitchRouting:
    """The router and the chosen expert's selection, listed before SAELens's SAE class: p = softmax(W_router (x -
    b_router)), e* = argmax p; f = p_{e*} TopK_k(ReLU(pre)) ('topk') or p_{e*} ReLU(pre) where pre >
    threshold_{e*} ('threshold', SAELens's JumpReLU comparison) over the chosen expert's pre-activations
    `pre_activations(x)`, and 0 on every other expert's latents."""

    def initialize_weights(self) -> None:
        super().initialize_weights()
        cfg = self.cfg
        self.W_router = nn.Parameter(torch.zeros(cfg.num_experts, cfg.d_in, dtype=self.dtype, device=self.device))
        self.b_router = nn.Parameter(torch.zeros(cfg.d_in, dtype=self.dtype, device=self.device))
        if cfg.activation == "threshold":
            self.threshold = nn.Parameter(torch.zeros(cfg.num_experts, dtype=self.dtype, device=self.device))

    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return F.relu

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's pre-activations [..., M]."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.linear(x.float() - self.b_router.float(), self.W_router.float()).softmax(-1)
        expert = probs.argmax(-1)
        hidden_pre = self.hook_sae_acts_pre(self.pre_activations(x))
        per_expert = hidden_pre.unflatten(-1, (self.cfg.num_experts, -1))
        block = expert[..., None, None].expand(*expert.shape, 1, per_expert.shape[-1])
        chosen = per_expert.gather(-2, block).squeeze(-2)  # [..., M_e]: the chosen expert's pre-activations
        if self.cfg.activation == "threshold":
            kept = self.activation_fn(chosen) * (chosen > self.threshold[expert][..., None])
        else:
            values, columns = chosen.topk(self.cfg.k, dim=-1)
            kept = torch.zeros_like(chosen).scatter_(-1, columns, self.activation_fn(values))
        kept = kept * probs.gather(-1, expert[..., None]).to(kept.dtype)
        acts = torch.zeros_like(per_expert).scatter_(-2, block, kept[..., None, :])
        return self.hook_sae_acts_post(acts.flatten(-2))


class SwitchSAELens(SwitchRouting, SAE[SwitchSAELensConfig]):
    """pre = (x - b_dec) W_enc (no encoder bias); f as `SwitchRouting`; x_hat = f W_dec + b_dec."""

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return self.process_sae_in(x) @ self.W_enc

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        sae_out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        return self.reshape_fn_out(self.run_time_activation_norm_fn_out(sae_out), self.d_head)


class SwitchTranscoderSAELens(SwitchRouting, Transcoder):
    """pre = x W_enc + b_enc; f as `SwitchRouting`; y_hat = f W_dec + b_dec (`Transcoder.decode`), [..., d_out]."""

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return self.process_sae_in(x) @ self.W_enc + self.b_enc

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> SwitchTranscoderSAELens:
        # Transcoder.from_dict builds a plain TranscoderConfig, which lacks the Switch entries
        return cls(get_sae_class(config_dict["architecture"])[1].from_dict(config_dict))


class SwitchSkipTranscoderSAELens(SwitchTranscoderSAELens, SkipTranscoder):
    """The Switch transcoder plus SAELens's skip: forward(x) = f W_dec + b_dec + x W_skip^T; `decode` leaves out the
    skip, which needs x (`SkipTranscoder`)."""


ARCHITECTURES = {
    SWITCH_ARCHITECTURE: (SwitchSAELens, SwitchSAELensConfig),
    SWITCH_TRANSCODER_ARCHITECTURE: (SwitchTranscoderSAELens, SwitchTranscoderSAELensConfig),
    SWITCH_SKIP_TRANSCODER_ARCHITECTURE: (SwitchSkipTranscoderSAELens, SwitchSkipTranscoderSAELensConfig),
}
"""What importing this module registers with SAELens: architecture -> (SAE class, config class)."""

for architecture, classes in ARCHITECTURES.items():
    if architecture not in SAE_CLASS_REGISTRY:  # importing twice (e.g. reloaded) registers once
        register_sae_class(architecture, *classes)
