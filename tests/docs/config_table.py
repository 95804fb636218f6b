"""The configuration reference of docs/configuration.md, generated from the dataclasses of `sae_dist/config.py` and
the shipped configs: `python tests/docs/config_table.py` prints it; `test_config_table.py` checks the page against it.

Each row: the key, its default in the schema, its value in the quickstart (`python launch/train.py`) and in the
paper's Switch SAE (`+experiment=switch_65k`), and the first sentence of the field's docstring.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]  # run as a script: the package and hydra_compose

from sae_dist import config as config_module  # noqa: E402

GROUPS = {
    "sae": config_module.SAEConfig,
    "model": config_module.ModelConfig,
    "data": config_module.DataConfig,
    "trainer": config_module.TrainerConfig,
    "parallel": config_module.ParallelConfig,
}
COMPOSED = {"python launch/train.py": [], "+experiment=switch_65k": ["+experiment=switch_65k"]}
"""The configurations whose values the table shows beside the schema's: a column per command."""
MEANING = {
    "parallel.ep_size": "P, the ranks that together hold all experts; null = the world size for an SAE with a router "
                        "(Switch, BatchTopK), 1 (plain data parallelism) for TopK and ReLU (`expert_parallel_size` in "
                        "`sae_dist/parallel/mesh.py`).",
}
"""Meanings the page states otherwise than the field's docstring, where the docstring falls short of the code."""
MATH_CITATION = re.compile(r"(?:SPEC|docs/math\.md) section (\d+)")
"""A docstring's citation of the math, as a link to its section of docs/math.md."""
START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"
RUN_STAMP = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d$")


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the first sentence of the string literal that follows its annotation in the class body."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            text = " ".join(str(after.value.value).split())
            docs[node.target.id] = re.split(r"(?<=[.)])\s(?=[A-Z])", text, maxsplit=1)[0]
    return docs


def render(value: Any) -> str:
    """A value as YAML writes it on the command line: null, true, 8192, 0.03125, [0.9, 0.999]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return json.dumps(value).replace('"', "")
    text = str(value)
    return RUN_STAMP.sub("<date>_<time>", text)


def default_of(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def compose_values(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """group -> key -> value of the composed run configuration (the same path as `launch/train.py`)."""
    from hydra_compose import compose_run

    return dataclasses.asdict(compose_run(overrides))


def rows() -> list[list[str]]:
    """The table's rows, header first."""
    composed = {label: compose_values(overrides) for label, overrides in COMPOSED.items()}
    table = [["key", "default", *(f"`{label}`" for label in COMPOSED), "meaning"]]
    for group, cls in GROUPS.items():
        docs = field_docs(cls)
        for field in dataclasses.fields(cls):
            values = [render(composed[label][group][field.name]) for label in COMPOSED]
            key = f"{group}.{field.name}"
            meaning = MATH_CITATION.sub(r"[the math, section \1](math.md#section-\1)",
                                        MEANING.get(key, docs.get(field.name, "")))
            table.append([f"`{key}`", render(default_of(field)), *values, meaning])
    return table


def markdown(table: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    header, *body = table
    separator = "|" + "|".join("---" for _ in header) + "|"
    return "\n".join([line(header), separator, *(line(row) for row in body)])


def table_in_page(page: Path) -> str:
    text = page.read_text()
    return text.split(START, 1)[1].split(END, 1)[0].strip()


if __name__ == "__main__":
    print(markdown(rows()))
