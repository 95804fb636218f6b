"""The names of activation sites as configs write them: `model.hookpoint` is `<module>[:input|:output]` (output by
default) or a glob over module names (a sweep item's), and `model.layer` stands for block L's output.

Only the syntax lives here, below the configuration's checks; what a name means in a given model is
`sae_dist/data/sites.py`'s."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sae_dist.config import ConfigError

if TYPE_CHECKING:
    from sae_dist.config import ModelConfig

SIDES = ("output", "input")
"""The sides of a module that `model.hookpoint` may read; output is the default."""


GLOB_CHARACTERS = "*?["


def hookpoint_parts(hookpoint: str) -> tuple[str, str]:
    """(module name or alias, side) of a `model.hookpoint` value: 'h.5.mlp' -> ('h.5.mlp', 'output'),
    'h.5:input' -> ('h.5', 'input'); a one-line ConfigError for an empty name or an unknown side."""
    name, colon, side = str(hookpoint).strip().partition(":")
    side = side if colon else "output"
    if side not in SIDES:
        raise ConfigError(f"model.hookpoint={hookpoint}: the side={side!r} is unknown; allowed: {', '.join(SIDES)}")
    if not name or " " in name:
        raise ConfigError(f"model.hookpoint={hookpoint!r} names no module")
    return name, side


def is_glob(hookpoint: str) -> bool:
    return any(c in str(hookpoint) for c in GLOB_CHARACTERS)


def site_key(model: ModelConfig) -> int | str:
    """The site of `model`: its hookpoint, or the block number `model.layer` (that block's output)."""
    return model.hookpoint if model.hookpoint is not None else model.layer


def site_label(model: ModelConfig) -> str:
    """A sweep member's site in its default name: 'L<layer>', or the hookpoint ('h.5.mlp', 'h.5-input')."""
    return f"L{model.layer}" if model.hookpoint is None else hookpoint_label(model.hookpoint)


def hookpoint_label(hookpoint: str) -> str:
    """A hookpoint as names and folders write it: 'h.5.mlp', 'h.5:input' -> 'h.5-input'."""
    name, side = hookpoint_parts(hookpoint)
    return name if side == "output" else f"{name}-{side}"
