"""The public API for trained SAEs: load a checkpoint, then encode and decode activations.

    from sae_dist import load_sae
    sae = load_sae("runs/quickstart/<date>")          # a run directory or a checkpoint folder
    latents = sae.encode(x_TD)                          # Latents(values_TK, indices_TK), values include p_{e*}
    x_hat_TD = sae.decode(latents)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sae_dist.models import build_sae
from sae_dist.run_dir import load_model_weights, read_checkpoint_config, resolve_checkpoint


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The SAE saved at `path` (a checkpoint folder, or a run directory: its latest checkpoint), in eval mode."""
    folder = resolve_checkpoint(path)
    run, d_model, _ = read_checkpoint_config(folder)
    model = build_sae(run.sae, d_model, run.trainer.seed)
    load_model_weights(folder, model)
    return model.to(device).eval()
