"""The "Every key" tables of docs/configuration.md, generated from `sae_dist/config.py` and the shipped configs.

`python tests/docs/config_table.py` prints them, `--write` puts them into the page; `test_config_table.py` checks the
page against them.

A row per run option: its key; its default in the schema; its value in the quickstart (`python launch/train.py`) and
in the paper's Switch SAE (`+experiment=switch_65k`); the facts declared beside it (`option(...)`, read with
`option_facts`): on resume, whether it changes what is learned, the code that checks it; and the first sentence of
its docstring (`sae_dist.cli.field_docs`). The performance switches have a table of their own.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]  # run as a script: the package and hydra_compose

from hydra_compose import compose_run  # noqa: E402

from sae_dist.cli import field_docs  # noqa: E402
from sae_dist.config import RunConfig, option_facts  # noqa: E402
from sae_dist.option_facts import CHANGEABLE, OptionFacts  # noqa: E402

PAGE = ROOT / "docs/configuration.md"
COMPOSED = {"python launch/train.py": [], "+experiment=switch_65k": ["+experiment=switch_65k"]}
"""The configurations whose values the tables show beside the schema's: a column per command."""
MATH_CITATION = re.compile(r"(?:SPEC|docs/math\.md) section (\d+)")
"""A docstring's citation of the math, as a link to its section of docs/math.md."""
FIRST_SENTENCE_END = re.compile(r"(?<=[.)])\s(?=[A-Z])")
"""Where a docstring's first sentence ends: after '.' or ')', before a capital ('e.g. the', '(1 = one)' go on)."""
START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"
RUN_STAMP = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d$")
"""The start time ending a default trainer.out_dir, shown as the placeholder the docs use for it."""
PERFORMANCE_INTRO = "Speed and memory settings, chosen by a benchmark for the hardware rather than by the experiment."

Values = dict[str, Any]
"""A composed run configuration as nested dicts (`dataclasses.asdict`)."""


def schema_options(schema: type = RunConfig, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, str]]:
    """(dotted key, its field, its docstring) of every option of `schema`, the groups' options under their group."""
    docs = field_docs(schema)
    for field in dataclasses.fields(schema):
        group = field.default_factory
        if isinstance(group, type) and dataclasses.is_dataclass(group):
            yield from schema_options(group, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}", field, docs.get(field.name, "")


def render(value: Any) -> str:
    """A value as YAML writes it on the command line: null, true, 8192, 0.03125, [0.9, 0.999]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return json.dumps(value).replace('"', "")
    return RUN_STAMP.sub("<date>_<time>", str(value))


def default_of(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def value_at(values: Values, key: str) -> Any:
    """values['trainer']['lr'] for key 'trainer.lr'."""
    for part in key.split("."):
        values = values[part]
    return values


def meaning(doc: str) -> str:
    """The docstring's first sentence, its citations of the math as links."""
    sentence = FIRST_SENTENCE_END.split(doc, maxsplit=1)[0]
    return MATH_CITATION.sub(r"[the math, section \1](math.md#section-\1)", sentence)


def fact_cells(facts: OptionFacts) -> list[str]:
    """on resume (a value a continued run may change in bold), changes what is learned, checked by."""
    on_resume = f"**{facts.on_resume}**" if facts.on_resume == CHANGEABLE else facts.on_resume
    checked = ", ".join(f"`{checker}`" for checker in facts.checked_by) or "-"
    return [on_resume, "yes" if facts.changes_math else "no", checked]


def rows(performance: bool, composed: dict[str, Values]) -> list[list[str]]:
    """The rows of the table of the performance switches (or of every other option), header first; `composed`: the
    values of each configuration of COMPOSED."""
    facts = option_facts()
    table = [["key", "default", *(f"`{label}`" for label in COMPOSED), "on resume", "changes what is learned",
              "checked by", "meaning"]]
    for key, field, doc in schema_options():
        if facts[key].performance != performance:
            continue
        values = [default_of(field), *(value_at(composed[label], key) for label in COMPOSED)]
        table.append([f"`{key}`", *(f"`{render(value)}`" for value in values), *fact_cells(facts[key]),
                      meaning(doc)])
    return table


def escape(cell: str) -> str:
    """A cell's text for a Markdown table: its pipes escaped, and outside code spans its '<' (a docstring's
    `runs/<name>` is text, not an HTML tag)."""
    spans = cell.replace("|", "\\|").split("`")
    return "`".join(span if i % 2 else span.replace("<", "&lt;") for i, span in enumerate(spans))


def markdown(table: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(escape(cell) for cell in cells) + " |"

    header, *body = table
    separator = "|" + "|".join("---" for _ in header) + "|"
    return "\n".join([line(header), separator, *(line(row) for row in body)])


def composed_values() -> dict[str, Values]:
    """label -> the run configuration it composes to (the same path as `launch/train.py`; nothing is loaded)."""
    return {label: dataclasses.asdict(compose_run(overrides)) for label, overrides in COMPOSED.items()}


def generated_block() -> str:
    """What the page holds between START and END: the options an experiment chooses, then the performance
    switches."""
    composed = composed_values()
    return "\n".join([
        "### What an experiment chooses",
        "",
        markdown(rows(performance=False, composed=composed)),
        "",
        "### Performance switches",
        "",
        PERFORMANCE_INTRO,
        "",
        markdown(rows(performance=True, composed=composed)),
    ])


def block_in_page(page: Path = PAGE) -> str:
    return page.read_text().split(START, 1)[1].split(END, 1)[0].strip()


def write_block(page: Path = PAGE) -> None:
    """Replace the page's generated block with the current one."""
    head, rest = page.read_text().split(START, 1)
    tail = rest.split(END, 1)[1]
    page.write_text(f"{head}{START}\n{generated_block()}\n{END}{tail}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_block()
    elif sys.argv[1:]:
        print(f"error: unknown arguments {' '.join(sys.argv[1:])}; usage: python {sys.argv[0]} [--write]",
              file=sys.stderr)
        sys.exit(2)
    else:
        print(generated_block())
