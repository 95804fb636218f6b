"""Any sae-dist SAE as SAEBench's custom SAE: one flat dictionary of M latents.

    from sae_dist.interop.saebench import load_saebench_sae
    sae = load_saebench_sae("runs/gpt2_switch/<date>", device="cuda")   # or as_saebench(load_sae(...), run)
    f = sae.encode(x)            # [..., M] dense; a Switch SAE's chosen expert holds p_e* z, the others zeros
    x_hat = sae.decode(f)        # f @ W_dec + b_dec: the SAE's own forward reconstruction

SAEBench (`sae-bench`, `sae_bench/custom_saes/base_sae.py`) evaluates any module with `encode(x) -> f [..., d_sae]`,
`decode(f)`, `forward(x) -> x_hat`, `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]` with unit-norm rows, `b_enc
[d_sae]`, `b_dec [d_in]`, `dtype`, `device`, a `to(device=, dtype=)` that updates both, and a mutable `cfg` naming
the site (`model_name`, `hook_name`, `hook_layer`, `context_size`) to which SAEBench's loader adds fields.

The flat form of an SAE: f is dense, the SAE's latent values (`SAE.encode`: f = p_i z_i for a Switch SAE's chosen
expert i, every chosen expert under top-e routing) at their global latent ids and zero elsewhere. Its linear decode
f W_dec + b_dec is then the SAE's forward reconstruction: sum_i p_i z_i W_dec^i + b_pre. The weights stay float32
(the router computes in float32 in training too); `to(dtype=...)` sets the dtype of the latents and reconstructions
handed back, inputs of any dtype are computed in float32. Nothing here imports SAEBench.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sae_dist.api import load_sae
from sae_dist.config import RunConfig
from sae_dist.interop.saelens import saelens_metadata
from sae_dist.models.base import SAE
from sae_dist.run_dir import read_checkpoint_config, resolve_checkpoint


@dataclass
class SAEBenchConfig:
    """The entries of SAEBench's `CustomSAEConfig` that its evaluations read."""

    model_name: str
    """The language model, as TransformerLens names it (SAEBench loads it with `from_pretrained_no_processing`)."""
    d_in: int
    d_sae: int
    hook_layer: int
    hook_name: str
    """TransformerLens hook of the activations: block L's output is blocks.L.hook_resid_post."""
    context_size: int | None = None
    architecture: str = ""
    """The sae-dist kind ('switch', 'topk', 'relu', 'batchtopk')."""
    dtype: str = "float32"
    device: str = "cpu"
    hook_head_index: int | None = None
    prepend_bos: bool = True
    normalize_activations: str = "none"
    """'none': an input scale of training (data.normalize_activations) is folded into the weights by `load_sae`."""
    apply_b_dec_to_input: bool = True
    activation_fn_str: str = ""
    dataset_path: str = ""
    dataset_trust_remote_code: bool = True
    model_from_pretrained_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_to(args: tuple, kwargs: dict) -> tuple[torch.device | None, torch.dtype | None]:
    """(device, dtype) of a `Module.to` call: to(device), to(dtype), to(device, dtype), to(tensor), keywords."""
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for arg in args:
        if isinstance(arg, torch.dtype):
            dtype = arg
        elif isinstance(arg, Tensor):
            device, dtype = arg.device, arg.dtype
        elif arg is not None:
            device = arg
    return (None if device is None else torch.device(device)), dtype


class SAEBenchSAE(nn.Module):
    """An sae-dist SAE holding every expert, in eval mode, as SAEBench's custom SAE (module docstring)."""

    def __init__(self, sae: SAE, cfg: SAEBenchConfig):
        super().__init__()
        self.sae = sae.float().eval()
        self.cfg = cfg
        self.device: torch.device = sae.b_dec.device
        self.dtype: torch.dtype = torch.float32
        self.cfg.device = str(self.device)

    W_enc = property(lambda self: self.sae.W_enc)  # noqa: N815 (SAEBench's names)
    """[d_in, d_sae], a view of the SAE's encoder (a Switch SAE's expert e owns columns e*M_e .. (e+1)*M_e - 1)."""
    W_dec = property(lambda self: self.sae.W_dec)  # noqa: N815
    """[d_sae, d_in] unit-norm decoder rows, a view."""
    b_enc = property(lambda self: self.sae.b_enc)
    """[d_sae]; zeros where the experts have no encoder bias (the Switch SAE)."""
    b_dec = property(lambda self: self.sae.b_dec)
    """[d_in], b_pre."""

    def to(self, *args, **kwargs) -> SAEBenchSAE:
        """Move the SAE to a device (its weights stay float32) and record the dtype of what it hands back."""
        device, dtype = _parse_to(args, kwargs)
        if device is not None:
            self.sae.to(device)
            self.device, self.cfg.device = device, str(device)
        if dtype is not None:
            self.dtype, self.cfg.dtype = dtype, str(dtype).removeprefix("torch.")
        return self

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Latents [..., d_sae] of activations [..., d_in]: the SAE's values at their global ids, zeros elsewhere."""
        x_TD = x.reshape(-1, x.shape[-1]).to(self.device, torch.float32)
        latents = self.sae.encode(x_TD)
        f_TM = x_TD.new_zeros(x_TD.shape[0], self.cfg.d_sae)
        f_TM.scatter_(1, latents.indices_TK, latents.values_TK.float())
        return f_TM.reshape(*x.shape[:-1], self.cfg.d_sae).to(self.dtype)

    @torch.no_grad()
    def decode(self, feature_acts: Tensor) -> Tensor:
        """f @ W_dec + b_dec: [..., d_sae] -> [..., d_in]."""
        f = feature_acts.to(self.device, torch.float32)
        return (f @ self.W_dec.float() + self.b_dec.float()).to(self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def check_decoder_norms(self, tolerance: float = 1e-5) -> bool:
        """Whether every decoder row has unit norm (SAEBench refuses SAEs that do not)."""
        norms = self.W_dec.float().norm(dim=1)
        return bool(torch.allclose(norms, torch.ones_like(norms), atol=tolerance))


def as_saebench(sae: SAE, run: RunConfig | None = None, model_name: str | None = None) -> SAEBenchSAE:
    """`sae` (holding every expert: `load_sae`'s model) as SAEBench's custom SAE; `run` names its site (the model,
    hook and context length; without it the site is empty), `model_name` overrides the model's name for
    TransformerLens (e.g. 'gpt2' for 'openai-community/gpt2')."""
    site = saelens_metadata(run) if run is not None else {"model_name": "", "hook_name": "", "hook_layer": -1}
    cfg = SAEBenchConfig(
        model_name=model_name or site["model_name"], d_in=sae.d_in, d_sae=sae.d_sae, hook_layer=site["hook_layer"],
        hook_name=site["hook_name"], context_size=site.get("context_size"), architecture=sae.kind,
        dataset_path=site.get("dataset_path") or "",
    )
    return SAEBenchSAE(sae, cfg)


def load_saebench_sae(path: str | Path, device: str | torch.device = "cpu",
                      model_name: str | None = None) -> SAEBenchSAE:
    """The SAE saved at `path` (a run directory or a checkpoint folder, as `load_sae` takes) as SAEBench's custom
    SAE, its site read from the checkpoint."""
    run, _, _ = read_checkpoint_config(resolve_checkpoint(path))
    return as_saebench(load_sae(path, device), run, model_name)
