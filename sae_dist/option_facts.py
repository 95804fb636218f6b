"""What each run option is, declared beside it in `sae_dist/config.py` with `option(...)`: whether a continued run
may change it, whether it changes what the SAE learns, whether it is a performance switch, and which code checks it.
The run's identity (`sae_dist/train/identity.py`), the comparison plots (`sae_dist/eval/runs.py`) and the docs read
these facts back through `sae_dist.config.option_facts`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from typing import Any

FIXED = "fixed"
"""A continued run keeps the saved value; a different one on its command line is refused."""


CHANGEABLE = "may change"
"""A continued run may take a new value (recorded in its resume history)."""


PER_COMMAND = "per command"
"""How this command finds the run: always taken from the command line, never compared with the saved value."""


ON_RESUME = (FIXED, CHANGEABLE, PER_COMMAND)


VALIDATE = "sae_dist.validation.validate"


LAYOUT = "sae_dist.parallel.mesh.validate_layout"


PREFLIGHT = "sae_dist.train.preflight"


ARCHITECTURE = "sae_dist.models.base.SAE.check_config"


CHECKERS = (VALIDATE, LAYOUT, PREFLIGHT, ARCHITECTURE)


@dataclass(frozen=True)
class OptionFacts:
    """What one option is, declared beside it (`option`)."""

    on_resume: str = FIXED
    """One of ON_RESUME: whether a continued run may change it."""
    changes_math: bool = True
    """Whether it changes what the SAE learns from which data, or the numbers that come out of it; False for where
    and how fast a run goes and how it reports. Runs that differ only in such settings are one line of a plot."""
    performance: bool = False
    """A speed or memory switch, chosen by a benchmark for the hardware rather than by the experiment."""
    checked_by: tuple[str, ...] = (VALIDATE,)
    """The code (of CHECKERS) that refuses its bad values, with a one-line ConfigError."""


FACTS_KEY = "sae_dist"
"""The key of a field's metadata that holds its OptionFacts."""


def option(default: Any = MISSING, *, default_factory: Callable[[], Any] | None = None, on_resume: str = FIXED,
           changes_math: bool = True, performance: bool = False,
           checked_by: tuple[str, ...] = (VALIDATE,)) -> Any:
    """A dataclass field carrying its `OptionFacts` (the defaults: fixed on resume, part of what is learned, checked
    by `validate`)."""
    metadata = {FACTS_KEY: OptionFacts(on_resume, changes_math, performance, checked_by)}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)
