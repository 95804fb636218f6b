"""Where in a language model activations are read (or replaced): a module of the model and a side of it.

A site is written `<module>[:input|:output]` (output by default; `model.hookpoint`), the module by its dotted name
in the base model as `AutoModel(...).named_modules()` gives it (GPT-2 `h.5.mlp`, MiniLM `encoder.layer.3.attention`);
the name under a model with a head (`transformer.h.5.mlp`) means the same module. A module's output is its first
tensor (the first item of a tuple); its input is the first tensor its forward gets by position, read by a forward
pre-hook. Aliases name the usual sites of block L where the architecture is known (`ALIASES`): `resid_pre.L`,
`resid_post.L`, `attn_out.L`, `mlp_in.L`, `mlp_out.L`; `resid_pre` and `resid_post` (a block's input and output)
work for every model whose blocks `find_blocks` finds. `model.layer=L` alone is `resid_post.L`.

Names are resolved against `named_modules()`: of the loaded model, or, before any weight is read, of its skeleton
built from its config on the meta device (`skeleton`). A wrong name is one ConfigError line with the closest names.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sae_dist.config import ConfigError, ModelConfig
from sae_dist.site_names import hookpoint_parts, is_glob

if TYPE_CHECKING:
    from transformers import PretrainedConfig

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

ALIASES: dict[str, dict[str, str]] = {
    "gpt2": {"attn_out": "h.{L}.attn", "mlp_in": "h.{L}.mlp:input", "mlp_out": "h.{L}.mlp"},
    # Post-LayerNorm BERT (MiniLM): the attention's and the MLP's own contributions, before dropout, the residual
    # and the LayerNorm; the MLP (intermediate dense + GELU, then output.dense) reads the attention block's output.
    "bert": {"attn_out": "encoder.layer.{L}.attention.output.dense", "mlp_in": "encoder.layer.{L}.intermediate:input",
             "mlp_out": "encoder.layer.{L}.output.dense"},
    "llama": {"attn_out": "layers.{L}.self_attn", "mlp_in": "layers.{L}.mlp:input", "mlp_out": "layers.{L}.mlp"},
}
"""Per model type (config.model_type), the templates of the aliases beyond resid_pre / resid_post."""
BLOCK_ALIASES = {"resid_pre": "input", "resid_post": "output"}


@dataclass(frozen=True)
class Site:
    """A resolved site: `module`, a name in the base model's `named_modules()` ('' is the base model), and `side`."""

    module: str
    side: str
    block: int | None = None
    """L when the site is block L's output (`model.layer`'s site), else None."""

    def __str__(self) -> str:
        return f"{self.module}:{self.side}"

    def describe(self) -> str:
        return f"{self.side} of {self.module or 'the model'}"


def block_path(model: nn.Module) -> str:
    """The dotted name of the block list of `model` (GPT-2 `h`, BERT `encoder.layer`, Llama `layers`, ...).

    Falls back to the only ModuleList whose length is `config.num_hidden_layers`."""
    for path in _BLOCK_PATHS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return path
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if len(found) != 1:
        raise ValueError(f"cannot tell the transformer blocks of {type(model).__name__}: {len(found)} candidates")
    return found[0]


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of `model` in order (see `block_path`)."""
    return model.get_submodule(block_path(model))


def base_model(model: nn.Module) -> nn.Module:
    """The model without its head (a Hugging Face model's `base_model`; the model itself otherwise)."""
    return getattr(model, "base_model", model)


def _in_base(model: nn.Module, name: str, names: Sequence[str]) -> str:
    """`name` as a name in the base model: a name under a model with a head (`transformer.h.5`) without its
    prefix when only that form is unknown."""
    prefix = getattr(model, "base_model_prefix", "")
    if name not in names and prefix and name.startswith(prefix + "."):
        return name.removeprefix(prefix + ".")
    return name


def block_index(module: str, blocks: str) -> int | None:
    """L when the module named `module` is block L or lies inside it (`blocks`: the block list's path), else None."""
    number = module.removeprefix(blocks + ".").split(".")[0]
    return int(number) if module.startswith(blocks + ".") and number.isdigit() else None


def _expand_alias(name: str, base: nn.Module) -> str | None:
    """The `module[:side]` an alias `kind.L` stands for in `base`, or None when `name` is no alias."""
    kind, _, number = name.rpartition(".")
    if not number.isdigit() or (kind not in BLOCK_ALIASES and not any(kind in a for a in ALIASES.values())):
        return None
    blocks = block_path(base)
    layer = int(number)
    if not layer < len(base.get_submodule(blocks)):
        raise ConfigError(f"model.hookpoint={name}: block {layer} is out of range: the model has "
                          f"{len(base.get_submodule(blocks))} blocks")
    if kind in BLOCK_ALIASES:
        return f"{blocks}.{layer}:{BLOCK_ALIASES[kind]}"
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    templates = ALIASES.get(model_type, {})
    if kind not in templates:
        known = ", ".join(k for k in ALIASES if kind in ALIASES[k])
        raise ConfigError(f"model.hookpoint={name}: the alias {kind} is known for model types {known}, not "
                          f"{model_type!r}; name the module (model.hookpoint=<module>[:input|:output])")
    return templates[kind].format(L=layer)


def resolve_site(model: nn.Module, hookpoint: str) -> Site:
    """The site `hookpoint` (module docstring) names in `model` (a base model, one with a head, or a skeleton);
    a one-line ConfigError for an unknown module (with the closest names) or a side it cannot have."""
    base = base_model(model)
    hookpoint = _expand_alias(hookpoint_parts(hookpoint)[0], base) or hookpoint
    name, side = hookpoint_parts(hookpoint)
    names = [n for n, _ in base.named_modules()]
    name = _in_base(model, name, names)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else f"; e.g. {', '.join(names[1:4])}"
        raise ConfigError(f"model.hookpoint={hookpoint}: the model has no module {name!r}{hint}")
    module = base.get_submodule(name)
    if side == "input":
        why = _why_no_input(base, name, module)
        if why:
            raise ConfigError(f"model.hookpoint={hookpoint}: {why}; read its output or another module")
    blocks = block_path(base)
    layer = block_index(name, blocks)
    return Site(name, side, layer if side == "output" and name == f"{blocks}.{layer}" else None)


def _why_no_input(base: nn.Module, name: str, module: nn.Module) -> str | None:
    """Why `module` (`name` in `base`) has no input activation, or None: the model itself and embeddings get token
    ids, and a forward without positional parameters gets no tensor by position."""
    if not name:
        return "the model itself gets token ids, not activations"
    if isinstance(module, nn.Embedding) or name.split(".")[-1].endswith("embeddings"):
        return f"{name} gets token ids or is called with keywords, not an activation"
    positional = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return None if positional else f"the forward of {name} takes no positional argument"


def block_site(model: nn.Module, layer: int) -> Site:
    """Block `layer`'s output (`model.layer`); a one-line ConfigError naming model.layer when it is out of range."""
    blocks = find_blocks(model)
    if not 0 <= layer < len(blocks):
        raise ConfigError(
            f"model.layer={layer} is out of range: the model has {len(blocks)} blocks (0..{len(blocks) - 1})"
        )
    return Site(f"{block_path(base_model(model))}.{layer}", "output", layer)


def model_site(model: nn.Module, cfg: ModelConfig) -> Site:
    """The site of `cfg` in `model`: `model.hookpoint`, else block `model.layer`'s output."""
    return resolve_site(model, cfg.hookpoint) if cfg.hookpoint else block_site(model, cfg.layer)


def run_sites(model: nn.Module, cfg: ModelConfig) -> list[Site]:
    """The sites one forward reads for `cfg`: its input site (`model_site`), then a transcoder's target site
    (`model.target_hookpoint`) when it has one; rows are [x | y] in that order."""
    if cfg.target_hookpoint is None:
        return [model_site(model, cfg)]
    try:
        target = resolve_site(model, cfg.target_hookpoint)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("model.hookpoint=", "model.target_hookpoint=", 1)) from None
    return [model_site(model, cfg), target]


def check_target_width(cfg: ModelConfig, width: int | None, d_out: int | None) -> None:
    """A transcoder's target site is `sae.d_out` wide: a one-line ConfigError naming both otherwise (`width` None:
    not known, nothing to check)."""
    if cfg.target_hookpoint is not None and width is not None and d_out is not None and width != d_out:
        raise ConfigError(f"model.target_hookpoint={cfg.target_hookpoint} is {width} wide, not sae.d_out={d_out}: set "
                          f"sae.d_out={width}")


def match_modules(pattern: str, names: Sequence[str]) -> list[str]:
    """The names of `names` that the glob `pattern` matches dot-separated part by part (`*` never spans a dot):
    `encoder.layer.*.attention` matches `encoder.layer.3.attention`, not `encoder.layer.3.attention.self`."""
    parts = pattern.split(".")
    return [n for n in names if len(n.split(".")) == len(parts)
            and all(fnmatch.fnmatchcase(a, b) for a, b in zip(n.split("."), parts, strict=True))]


def expand_hookpoint(model: nn.Module, hookpoint: str, option: str = "model.hookpoint") -> list[str]:
    """The hookpoints a glob `hookpoint` stands for in `model`, in module order: over module names
    (`encoder.layer.*.attention[:side]`) or over the block numbers of an alias (`mlp_in.*` is `mlp_in.0`,
    `mlp_in.1`, ...); a one-line ConfigError naming `option` when it matches nothing."""
    name, side = hookpoint_parts(hookpoint)
    base = base_model(model)
    kind, _, number = name.rpartition(".")
    if kind in BLOCK_ALIASES or any(kind in templates for templates in ALIASES.values()):
        layers = range(len(find_blocks(base)))
        matched = [f"{kind}.{layer}" for layer in layers if fnmatch.fnmatchcase(str(layer), number)]
        for alias in matched[:1]:  # an alias unknown for this model type: its one-line error
            _expand_alias(alias, base)
    else:
        names = [n for n, _ in base.named_modules()]
        matched = [f"{n}:{side}" for n in match_modules(name, names) or match_modules(_in_base(model, name, []), names)]
    if not matched:
        raise ConfigError(f"{option}={hookpoint} matches no module of the model")
    return matched


def site_block(model: nn.Module, hookpoint: str) -> int | None:
    """L when the site `hookpoint` names lies in block L (is the block, its input or output, or a module in it)."""
    return block_index(resolve_site(model, hookpoint).module, block_path(base_model(model)))


def expand_site_pairs(model: nn.Module, hookpoint: str, target: str | None) -> list[tuple[str, str | None]]:
    """The (model.hookpoint, model.target_hookpoint) pairs of a sweep item whose hookpoint is a glob: each match of
    `hookpoint` with `target` (None: an SAE), or, `target` a glob too, with the match of `target` in the same block
    (`mlp_in.*` with `mlp_out.*`: one transcoder per block). A one-line ConfigError when the globs match different
    numbers of sites or not one site per block each, in the same blocks."""
    inputs = expand_hookpoint(model, hookpoint)
    if target is None or not is_glob(target):
        return [(one, target) for one in inputs]
    targets = expand_hookpoint(model, target, "model.target_hookpoint")
    if len(inputs) != len(targets):
        raise ConfigError(f"model.target_hookpoint={target} matches {len(targets)} sites but model.hookpoint="
                          f"{hookpoint} matches {len(inputs)}: a pair of globs makes one transcoder per block")
    input_blocks = [site_block(model, one) for one in inputs]
    target_blocks = [site_block(model, one) for one in targets]
    if None in input_blocks or len(set(input_blocks)) != len(inputs) or set(input_blocks) != set(target_blocks):
        raise ConfigError(f"model.hookpoint={hookpoint} and model.target_hookpoint={target} do not pair by block: "
                          f"their matches lie in blocks {input_blocks} and {target_blocks}; each glob must match "
                          "one site in each of the same blocks")
    target_of_block = dict(zip(target_blocks, targets, strict=True))
    return [(one, target_of_block[block]) for one, block in zip(inputs, input_blocks, strict=True)]


def skeleton(config: PretrainedConfig) -> nn.Module:
    """The base model of `config` with its modules and no weights (meta device): names and shapes, built in
    milliseconds to seconds without reading a weight."""
    from transformers import AutoModel

    with torch.device("meta"):
        return AutoModel.from_config(config)


def site_width(model: nn.Module, site: Site) -> int | None:
    """The width d of `site`'s activations as the module's weights tell it, without running it: a Linear's (or
    GPT-2 Conv1D's) output or input width, a LayerNorm's; of a module holding several, the last one's output or the
    first one's input. None when no such module says."""
    module = base_model(model).get_submodule(site.module)
    widths = []
    for m in module.modules():
        if isinstance(m, nn.Linear):
            widths.append((m.in_features, m.out_features))
        elif isinstance(m, nn.LayerNorm) and m.normalized_shape:
            widths.append((m.normalized_shape[-1], m.normalized_shape[-1]))
        elif type(m).__name__ == "Conv1D" and hasattr(m, "nf"):  # GPT-2's transposed Linear
            widths.append((m.weight.shape[0], m.nf))
    if not widths:
        return None
    return widths[-1][1] if site.side == "output" else widths[0][0]


def site_module(model: nn.Module, site: Site) -> nn.Module:
    """The module of `site` in `model` (a base model or one with a head)."""
    return base_model(model).get_submodule(site.module)


def _first_tensor(values: tuple | Tensor) -> Tensor:
    return values[0] if isinstance(values, tuple) else values


@contextmanager
def splice(module: nn.Module, fn: Callable[[Tensor], Tensor | None], side: str = "output") -> Iterator[None]:
    """Within the context, every call of `module` hands its activation h [B, T, d] on `side` (its first output
    tensor, or the first floating tensor its forward gets by position) to fn; where fn returns a tensor, h is
    replaced by it [B, T, d]."""
    if side == "output":

        def after(module: nn.Module, args: tuple, output: Tensor | tuple) -> Tensor | tuple | None:
            new = fn(_first_tensor(output))
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = module.register_forward_hook(after)
    else:

        def before(module: nn.Module, args: tuple) -> tuple | None:
            index = next((i for i, a in enumerate(args) if isinstance(a, Tensor) and a.is_floating_point()), None)
            if index is None:
                raise ConfigError(f"the forward of {type(module).__name__} gets no activation by position (it is "
                                  "called with keywords); read its output or another module")
            new = fn(args[index])
            return None if new is None else (*args[:index], new, *args[index + 1:])

        handle = module.register_forward_pre_hook(before)
    try:
        yield
    finally:
        handle.remove()
