"""Export to SAELens's on-disk format: a folder with cfg.json and sae_weights.safetensors.

Dense TopK and ReLU SAEs become SAELens's built-in 'topk' and 'standard' SAEs, a dense BatchTopK SAE (N = 1) its
'jumprelu' SAE. A Switch SAE (TopK or BatchTopK experts) becomes the 'sae_dist_switch' architecture (`import
sae_dist.interop.saelens_switch` registers it with SAELens), or, with `per_expert`, N standard SAEs ('topk', or
'jumprelu' for BatchTopK experts) in expert_000/, expert_001/, ...: expert e's SAE gives the latents z the Switch SAE
computes for a token routed to e, and its reconstruction z W_dec^e + b_pre before the router gate (the Switch SAE's
x_hat is p_e * (that - b_pre) + b_pre).

An SAE trained on normalised activations (data.normalize_activations) exports as `load_sae` gives it, its input
scale folded into the weights: the export takes raw activations, and its `normalize_activations` is 'none'.

Only this module knows the file layout; which architecture and weights an SAE exports is the model's
`saelens_state()` (`sae_dist/models/base.py`) and, per expert, `ExpertSAE.saelens_expert_states()`. Nothing here
imports SAELens.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from sae_dist.config import RunConfig
from sae_dist.models.base import SAE
from sae_dist.models.expert_sae import ExpertSAE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
"""The SAELens version whose config layout this writes (older layouts are converted by SAELens on load)."""


def saelens_metadata(run: RunConfig) -> dict:
    """Where the activations came from, in SAELens's metadata keys (TransformerLens hook names: block L's output
    is blocks.L.hook_resid_post)."""
    layer = run.model.layer
    return {
        "model_name": run.model.name, "hook_name": f"blocks.{layer}.hook_resid_post", "hook_layer": layer,
        "context_size": run.data.ctx_len, "dataset_path": run.data.dataset, "prepend_bos": True,
        "sae_dist_kind": run.sae.kind, "sae_lens_version": SAELENS_FORMAT_VERSION,
    }


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


def export_saelens(sae: SAE, run: RunConfig, out: Path, per_expert: bool = False) -> list[Path]:
    """Write `sae` (holding every expert) in SAELens's format into the new folder `out`; return the SAE folders.

    Written into a temporary sibling, then renamed: an interrupted export leaves no partial `out`."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if per_expert:
        if not isinstance(sae, ExpertSAE) or sae.router is None:
            raise ValueError(f"--per-expert needs a Switch SAE (sae.kind={sae.kind!r} has no experts)")
        names = [f"expert_{e:03d}" for e in range(sae.num_local_experts)]
        for name, (architecture, entries, weights) in zip(names, sae.saelens_expert_states(), strict=True):
            _write_folder(tmp / name, architecture, entries, weights, sae.d_in, run)
    else:
        names = ["."]
        architecture, entries, weights = sae.saelens_state()
        _write_folder(tmp, architecture, entries, weights, sae.d_in, run)
    os.replace(tmp, out)
    return [(out / name).resolve() for name in names]
