"""The public API: a language model's activations for text, and trained SAEs that encode and decode them.

    from sae_dist import activations, load_sae
    x = activations(["The cat sat on the mat."], model="minilm-bundled", layer=3)[0]   # [tokens, d] float32
    mlp = activations(["The cat sat."], model="minilm-bundled", hookpoint="mlp_out.3")[0]  # any module's output
    sae = load_sae("runs/quickstart/<date>")          # a run directory or a checkpoint folder
    latents = sae.encode(x)                           # Latents(values_TK, indices_TK), values include p_{e*}
    x_hat = sae.decode(latents)

`ActivationSite.of_sae(path)` reads the site an SAE was trained on (its model, block or hookpoint, and context
length). A hookpoint (`model.hookpoint` syntax, sae_dist/data/sites.py) is checked against the model's modules
before its weights load.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from sae_dist.config import ModelConfig, RunConfig
from sae_dist.data.lm import HookedLM, lm_skeleton, load_lm
from sae_dist.data.sites import model_site
from sae_dist.data.text import ContextCutter
from sae_dist.models import SAE, build_sae
from sae_dist.run_dir import load_model_weights, read_checkpoint_config, read_input_scales, resolve_checkpoint
from sae_dist.validation import validate


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """The SAE saved at `path` (a checkpoint folder, or a run directory: its latest checkpoint), in eval mode. It
    takes and returns raw activations: the input scale of training (data.normalize_activations), and a transcoder's
    target scale, are folded into its weights (`SAE.fold_input_scale_`)."""
    folder = resolve_checkpoint(path)
    run, d_model, _ = read_checkpoint_config(folder)
    model = build_sae(run.sae, d_model, run.trainer.seed)
    load_model_weights(folder, model)
    input_scale, target_scale = read_input_scales(folder)
    if input_scale is not None:
        model.fold_input_scale_(input_scale, target_scale)
    return model.to(device).eval()


class ActivationSite:
    """A language model read at one site, the output of block `layer` or `hookpoint` (a module's input or output),
    by the code the trainer's 'lm' source runs: each text tokenised and cut into contexts of at most `ctx_len`
    tokens (`ContextCutter`), the contexts run through the model up to that site (`HookedLM.capture`), padding
    dropped.

    `model` is a Hugging Face id or 'minilm-bundled'; `path` a local copy; `dtype` as `model.dtype`. transformers
    loads when a site is made, not when this module is imported.
    """

    def __init__(self, model: str = "openai-community/gpt2", layer: int = 8, ctx_len: int = 128,
                 path: str | None = None, dtype: str = "auto", device: str | torch.device = "cpu",
                 batch_size: int = 32, hookpoint: str | None = None):
        cfg = ModelConfig(name=model, path=path, layer=layer, dtype=dtype, hookpoint=hookpoint)
        validate(RunConfig(model=cfg))
        frame = lm_skeleton(cfg) if hookpoint is not None else None
        if frame is not None:  # a wrong name fails before the weights load
            model_site(frame, cfg)
        self.lm_model, self.tokenizer = load_lm(cfg, device)
        self.hooked = HookedLM(self.lm_model, model_site(self.lm_model, cfg))
        self.ctx_len, self.batch_size = ctx_len, batch_size
        self.cut = ContextCutter(self.tokenizer, ctx_len)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @classmethod
    def of_sae(cls, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32) -> ActivationSite:
        """The site the SAE saved at `path` was trained on."""
        run, _, _ = read_checkpoint_config(resolve_checkpoint(path))
        m = run.model
        return cls(m.name, m.layer, run.data.ctx_len, m.path, m.dtype, device, batch_size, m.hookpoint)

    @property
    def d_model(self) -> int:
        return self.hooked.d_model

    def __call__(self, texts: Sequence[str]) -> list[Tensor]:
        """One float32 [tokens, d] tensor per text: its contexts in order, each with the tokenizer's special
        tokens as in training (e.g. [CLS] ... [SEP] for BERT-like models)."""
        per_text = self.cut(list(texts))
        contexts = [context for text_contexts in per_text for context in text_contexts]
        rows = [self.hooked.capture(contexts[i : i + self.batch_size], self.pad_id).float()
                for i in range(0, len(contexts), self.batch_size)]
        rows_ND = torch.cat(rows) if rows else torch.zeros(0, self.d_model, device=self.hooked.device)
        tokens = [sum(len(c) for c in text_contexts) for text_contexts in per_text]
        return list(rows_ND.split(tokens))


def activations(texts: Sequence[str], model: str = "openai-community/gpt2", layer: int = 8, **options) -> list[Tensor]:
    """A model's activations at the output of block `layer` (or at `hookpoint=...`, one of `options`) for each text:
    one float32 [tokens, d] tensor per text. Loads the model on every call; keep an `ActivationSite` to read many
    batches (`options` are its)."""
    return ActivationSite(model, layer, **options)(texts)
