"""The Switch SAE as a SAELens architecture, 'sae_dist_switch' (importing this module registers it).

    import sae_dist.interop.saelens_switch  # noqa: F401
    from sae_lens import SAE
    sae = SAE.load_from_disk("exported/")           # written by launch/export.py --format saelens
    f = sae.encode(x)                                # [..., M], f = p_{e*} z as sae-dist's encode reports
    x_hat = sae.decode(f)

SAELens's layout: W_enc [d_in, M] (expert e owns columns e*M_e .. (e+1)*M_e - 1), W_dec [M, d_in], b_dec (b_pre);
plus W_router [N, d_in] and b_router [d_in], and for `activation` 'threshold' (BatchTopK experts) threshold [N].
The forward is docs/math.md section 2's, written densely (every expert's encoder on every token, then the chosen
expert's selection): simple, and slower than sae-dist's by the factor N.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sae_lens import SAE, SAEConfig, register_sae_class
from sae_lens.registry import SAE_CLASS_REGISTRY
from torch import nn

from sae_dist.models.switch import SWITCH_ARCHITECTURE

ACTIVATIONS = ("topk", "threshold")


@dataclass
class SwitchSAELensConfig(SAEConfig):
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

    @classmethod
    def architecture(cls) -> str:
        return SWITCH_ARCHITECTURE


class SwitchSAELens(SAE[SwitchSAELensConfig]):
    """p = softmax(W_router (x - b_router)), e* = argmax p, pre = (x - b_dec) W_enc^{e*};
    f = p_{e*} TopK_k(ReLU(pre)) ('topk') or p_{e*} ReLU(pre) where pre > threshold_{e*} ('threshold', SAELens's
    JumpReLU comparison); x_hat = f W_dec + b_dec."""

    def initialize_weights(self) -> None:
        super().initialize_weights()
        cfg = self.cfg
        self.W_router = nn.Parameter(torch.zeros(cfg.num_experts, cfg.d_in, dtype=self.dtype, device=self.device))
        self.b_router = nn.Parameter(torch.zeros(cfg.d_in, dtype=self.dtype, device=self.device))
        if cfg.activation == "threshold":
            self.threshold = nn.Parameter(torch.zeros(cfg.num_experts, dtype=self.dtype, device=self.device))

    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return F.relu

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.linear(x.float() - self.b_router.float(), self.W_router.float()).softmax(-1)
        expert = probs.argmax(-1)
        hidden_pre = self.hook_sae_acts_pre(self.process_sae_in(x) @ self.W_enc)
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

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        sae_out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        return self.reshape_fn_out(self.run_time_activation_norm_fn_out(sae_out), self.d_head)


if SWITCH_ARCHITECTURE not in SAE_CLASS_REGISTRY:  # importing twice (e.g. reloaded) registers once
    register_sae_class(SWITCH_ARCHITECTURE, SwitchSAELens, SwitchSAELensConfig)
