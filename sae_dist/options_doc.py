"""docs/options.md: every run option with its default and its facts (`sae_dist.config.option`), the choices of an
experiment first and the performance switches apart. Regenerate with `python -m sae_dist.options_doc > docs/options.md`
(tests/test_config.py checks that the file is current)."""

from __future__ import annotations

import dataclasses
import re

from sae_dist.cli import field_docs
from sae_dist.config import (
    CHANGEABLE,
    DataConfig,
    ModelConfig,
    OptionFacts,
    ParallelConfig,
    RunConfig,
    SAEConfig,
    TrainerConfig,
    option_facts,
)

SECTIONS = {"": RunConfig, "sae.": SAEConfig, "model.": ModelConfig, "data.": DataConfig, "trainer.": TrainerConfig,
            "parallel.": ParallelConfig}

HEADER = """# Run options

Generated from `sae_dist/config.py` by `python -m sae_dist.options_doc > docs/options.md`: each option's facts are
declared beside it (`option(...)`) and read from there by the run's identity (`sae_dist/train/identity.py`: what a
continued run may change), the comparison plots (`sae_dist/eval/runs.py`: what splits a line) and this page.

- **on resume**: *fixed* (a continued run keeps the saved value and refuses another), *may change* (recorded in the
  run's resume history) or *per command* (how the command finds the run; never compared).
- **changes what is learned**: whether runs that differ in it are different experiments (no: where and how fast it
  ran and how it reported).
- **checked by**: the code that refuses a bad value with one line; `-`: only its type is checked (by OmegaConf).
"""


def _default(field: dataclasses.Field) -> str:
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        value = field.default
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _rows(performance: bool) -> list[str]:
    facts = option_facts()
    rows = []
    for prefix, schema in SECTIONS.items():
        docs = field_docs(schema)
        for field in dataclasses.fields(schema):
            name = f"{prefix}{field.name}"
            if name not in facts or facts[name].performance != performance:
                continue
            rows.append(_row(name, _default(field), facts[name], docs.get(field.name, "")))
    return rows


def _row(name: str, default: str, facts: OptionFacts, doc: str) -> str:
    first_sentence = re.split(r"(?<=[A-Za-z0-9)'])\. (?=[A-Z'])", doc)[0].rstrip(".").replace("|", "\\|")
    learned = "yes" if facts.changes_math else "no"
    checked = ", ".join(f"`{checker}`" for checker in facts.checked_by) or "-"
    on_resume = f"**{facts.on_resume}**" if facts.on_resume == CHANGEABLE else facts.on_resume
    return f"| `{name}` | `{default}` | {on_resume} | {learned} | {checked} | {first_sentence} |"


def options_markdown() -> str:
    head = ("| option | default | on resume | changes what is learned | checked by | what it is |\n"
            "|---|---|---|---|---|---|")
    return "\n".join([
        HEADER,
        "## What an experiment chooses",
        "",
        head,
        *_rows(performance=False),
        "",
        "## Performance switches",
        "",
        "Speed and memory settings, chosen by a benchmark for the hardware rather than by the experiment.",
        "",
        head,
        *_rows(performance=True),
        "",
    ])


if __name__ == "__main__":
    print(options_markdown(), end="")
