"""Export to SAELens's on-disk format: a folder with cfg.json and sae_weights.safetensors.

Dense TopK and ReLU SAEs become SAELens's built-in 'topk' and 'standard' SAEs, a dense BatchTopK SAE (N = 1) its
'jumprelu' SAE. A Switch SAE (TopK or BatchTopK experts) becomes the 'sae_dist_switch' architecture (`import
sae_dist.interop.saelens_switch` registers it with SAELens), or, with `per_expert`, N standard SAEs ('topk', or
'jumprelu' for BatchTopK experts) in expert_000/, expert_001/, ...: expert e's SAE gives the latents z the Switch SAE
computes for a token routed to e, and its reconstruction z W_dec^e + b_pre before the router gate (the Switch SAE's
x_hat is p_e * (that - b_pre) + b_pre).

A transcoder exports as the transcoder form of the same ('transcoder', 'jumprelu_transcoder',
'sae_dist_switch_transcoder'; 'skip_' before 'transcoder' with the skip), b_in folded into b_enc; a dense TopK
transcoder, which SAELens has no class for, is the 'sae_dist_switch_transcoder' with N = 1, and per expert so is each
TopK expert.

The metadata names the site: `hook_name` is the TransformerLens hook where one matches the site (block L's input and
output `blocks.L.hook_resid_pre` / `hook_resid_post`, its attention's and MLP's outputs `blocks.L.hook_attn_out` /
`hook_mlp_out` in GPT-2-like and Llama-like models), else the Hugging Face module path (with ':input' for an input);
`hf_hook_name` (SAELens's key; also written as `hf_hook_point`, the name earlier exports used) is always the module
path and side (`sae_dist/data/sites.py`); a transcoder's target site is `hook_name_out` and `hf_hook_name_out`
alike. Both need the model's config.json where the export runs; without it `hook_name` is `model.hookpoint` as
written, or `blocks.L.hook_resid_post` for `model.layer`, and `hook_name_out` `model.target_hookpoint` as written.

An SAE trained on normalised activations (data.normalize_activations) exports as `load_sae` gives it, its input
scale (a transcoder's two scales) folded into the weights: the export takes and returns raw activations, and its
`normalize_activations` is 'none'.

Only this module knows the file layout; which architecture and weights an SAE exports is the model's
`saelens_state()` (`sae_dist/models/base.py`) and, per expert, `ExpertSAE.saelens_expert_states()`. Nothing here
imports SAELens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from sae_dist.config import ConfigError, RunConfig
from sae_dist.data import sites
from sae_dist.models.base import SAE, architecture
from sae_dist.train.preflight import model_config, model_skeleton

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
"""The SAELens version whose config layout this writes (older layouts are converted by SAELens on load)."""


_TRANSFORMERLENS_PARTS = {"attn": "attn_out", "self_attn": "attn_out", "mlp": "mlp_out"}
"""Submodules of a block whose output is a TransformerLens hook (GPT-2 `h.L.attn`, Llama `layers.L.self_attn`)."""


def transformerlens_hook(site: sites.Site, blocks: str) -> str | None:
    """The TransformerLens hook name of `site` in a model whose blocks are at `blocks`, or None where none matches."""
    match = re.fullmatch(rf"{re.escape(blocks)}\.(\d+)(?:\.(\w+))?", site.module)
    if match is None:
        return None
    layer, part = match.groups()
    if part is None:
        return f"blocks.{layer}.hook_resid_{'pre' if site.side == 'input' else 'post'}"
    hook = _TRANSFORMERLENS_PARTS.get(part)
    return f"blocks.{layer}.hook_{hook}" if hook and site.side == "output" else None


def site_hooks(site: sites.Site, blocks: str) -> tuple[str, str]:
    """(hook name, Hugging Face hook point) of `site` (module docstring)."""
    return transformerlens_hook(site, blocks) or (site.module if site.side == "output" else str(site)), str(site)


def resolved_sites(run: RunConfig) -> tuple[list[sites.Site], str] | None:
    """(the sites `run` reads, `sites.run_sites`: its input, then a transcoder's target; its block path) in its
    model's skeleton, or None when its config.json is not on this machine."""
    try:
        config = model_config(run.model)
    except ConfigError:
        return None
    if config is None:
        return None
    skeleton = model_skeleton(config)
    return sites.run_sites(skeleton, run.model), sites.block_path(skeleton)


def saelens_metadata(run: RunConfig) -> dict:
    """Where the activations came from, in SAELens's metadata keys (module docstring); a transcoder's target site
    as `hook_name_out` and `hf_hook_name_out`."""
    layer, found = run.model.layer, resolved_sites(run)
    hook_name, hf_hook_point = f"blocks.{layer}.hook_resid_post", None  # model.layer's site, unresolved
    hook_name_out, hf_hook_name_out = run.model.target_hookpoint, None
    if found is not None:
        (site, *target), blocks = found
        hook_name, hf_hook_point = site_hooks(site, blocks)
        layer = sites.block_index(site.module, blocks)
        if target:
            hook_name_out, hf_hook_name_out = site_hooks(target[0], blocks)
    elif run.model.hookpoint is not None:
        hook_name, layer = run.model.hookpoint, None
    metadata = {
        "model_name": run.model.name, "hook_name": hook_name, "hook_layer": layer, "hf_hook_name": hf_hook_point,
        "hf_hook_point": hf_hook_point,
        "context_size": run.data.ctx_len, "dataset_path": run.data.dataset, "prepend_bos": True,
        "sae_dist_kind": run.sae.kind, "sae_lens_version": SAELENS_FORMAT_VERSION,
    }
    if run.model.target_hookpoint is not None:
        metadata |= {"hook_name_out": hook_name_out, "hf_hook_name_out": hf_hook_name_out}
    return metadata


def _write_folder(folder: Path, architecture: str, entries: dict, weights: dict[str, Tensor], d_in: int,
                  run: RunConfig) -> None:
    folder.mkdir(parents=True)
    tensors = {name: t.detach().float().contiguous().cpu() for name, t in weights.items()}
    d_sae = tensors["W_dec"].shape[0]
    cfg = {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", **entries,
           "metadata": saelens_metadata(run)}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2))


def check_export(run: RunConfig, per_expert: bool) -> None:
    """What an export of `run`'s SAE needs, told from its config before the SAE is loaded (ValueError)."""
    if per_expert and not architecture(run.sae.kind).routed:
        raise ValueError(f"--per-expert needs a Switch SAE (sae.kind={run.sae.kind!r} has no experts)")


def export_saelens(sae: SAE, run: RunConfig, out: Path, per_expert: bool = False) -> list[Path]:
    """Write `sae` (holding every expert) in SAELens's format into the new folder `out`; return the SAE folders.

    Written into a temporary sibling, then renamed: an interrupted export leaves no partial `out`."""
    check_export(run, per_expert)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if per_expert:
        names = [f"expert_{e:03d}" for e in range(sae.num_local_experts)]
        for name, (architecture, entries, weights) in zip(names, sae.saelens_expert_states(), strict=True):
            _write_folder(tmp / name, architecture, entries, weights, sae.d_in, run)
    else:
        names = ["."]
        architecture, entries, weights = sae.saelens_state()
        _write_folder(tmp, architecture, entries, weights, sae.d_in, run)
    os.replace(tmp, out)
    return [(out / name).resolve() for name in names]
