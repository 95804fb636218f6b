"""An offline English corpus on every machine: the documentation that CPython ships.

Documents are the `pydoc_data.topics` entries (the language reference topics) followed by the module, class and
function docstrings of the standard library's own source files, read with `ast` (nothing is imported or run).
Order is deterministic: topics by key, then files by path, docstrings in source order; short docstrings
(fewer than `min_chars` characters) are skipped since they are mostly one-line summaries.

Parsing the standard library takes seconds, so `python_docs_dataset` builds the corpus once per Python version
as a `datasets` Arrow table in the Hugging Face cache and memory-maps it afterwards.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasets import Dataset

DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(path: Path, min_chars: int) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, DOCSTRING_NODES):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                yield doc


def python_documents(min_chars: int = 200) -> list[str]:
    """The topics, then the standard library's docstrings (tests and site-packages excluded)."""
    from pydoc_data.topics import topics

    documents = [topics[key] for key in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib).parts
        if relative[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in relative:
            continue
        documents.extend(_docstrings(path, min_chars))
    return documents


def _rows(text_column: str, python: str, min_chars: int) -> Iterator[dict[str, str]]:
    for doc in python_documents(min_chars):
        yield {text_column: doc}


def python_docs_dataset(text_column: str = "text", min_chars: int = 200) -> Dataset:
    """`python_documents` as a dataset with one column, built once per Python version (its fingerprint) and then
    read from the `datasets` cache."""
    from datasets import Dataset

    python = f"{sys.version} {sysconfig.get_paths()['stdlib']}"
    return Dataset.from_generator(
        _rows, gen_kwargs={"text_column": text_column, "python": python, "min_chars": min_chars}
    )
