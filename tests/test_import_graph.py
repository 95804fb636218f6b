"""The package's import graph: no cycle, no function-level import of a sae_dist module, no import that climbs a floor;
and the training launcher's imports: bad input is reported, and synthetic and cached runs train, without the heavy
libraries.

The graph is read from the source with `ast`: every `import` statement of every module, at module level or inside a
function. Imports under `if TYPE_CHECKING:` count like the others, in the cycle check and the floor check: they never
run, but a module that names another's types depends on it all the same, and a type-only cycle becomes an import
error the day one of its imports is needed at run time (an isinstance, a default value). The guard hides a cycle;
it does not remove it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from sae_dist.data.cache_writer import write_cache
from sae_dist.data.synthetic import SyntheticSource

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sae_dist"

FLOORS = (
    ("sae_dist.config", "sae_dist.console", "sae_dist.flops", "sae_dist.metrics", "sae_dist.run_dir",
     "sae_dist.checksums", "sae_dist.launcher_env", "sae_dist.host_memory", "sae_dist.run_lock",
     "sae_dist.parent_watch", "sae_dist.option_facts", "sae_dist.site_names", "sae_dist.validation"),
    ("sae_dist.models", "sae_dist.data"),
    ("sae_dist.api",),
    ("sae_dist.parallel",),
    ("sae_dist.train",),
    ("sae_dist.eval",),
    ("sae_dist.interop",),
    ("sae_dist.cli", "sae_dist.cli_inspection", "sae_dist.launch_guards", "sae_dist.multirun_check", "sae_dist"),
)
"""The floors of the package, bottom first: a module may import from its own floor and the floors below it. The
public API (`load_sae`, `ActivationSite`) reads what models/ and data/ make, and evaluation builds on it, so it sits
right above them; the package itself (`sae_dist/__init__.py`) and the command-line conventions are the top."""

HEAVY = ("transformers", "datasets", "deepspeed")
"""Libraries that take seconds to import and that bad input or a run without text never needs."""


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]) -> list[str]:
    """The sae_dist modules an import statement loads: `from sae_dist import run_dir` loads sae_dist.run_dir."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "sae_dist"]
    base = node.module or ""
    if node.level:
        anchor = importer.split(".") if is_package else importer.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, *([base] if base else [])])
    if base.split(".")[0] != "sae_dist":
        return []
    submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
    return submodules if len(submodules) == len(node.names) else [base, *submodules]


def imports_of(name: str, path: Path, modules: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(child, name, path.name == "__init__.py", modules):
                    found.append(Import(name, target, child.lineno, in_function))
            else:
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return found


def import_graph() -> list[Import]:
    modules = all_modules()
    return [imp for name, path in modules.items() for imp in imports_of(name, path, set(modules))]


def cycles(edges: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if edge.imported != edge.importer:
            graph.setdefault(edge.importer, set()).add(edge.imported)
            graph.setdefault(edge.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(components)


def floor_of(module: str) -> int:
    """The floor of a module: that of the longest prefix FLOORS names."""
    best, floor = -1, -1
    for level, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), level
    assert floor >= 0, f"{module} is on no floor of FLOORS"
    return floor


def _where(edge: Import) -> str:
    return f"{all_modules()[edge.importer].relative_to(ROOT)}:{edge.line} imports {edge.imported}"


def test_every_module_is_on_a_floor():
    for module in all_modules():
        floor_of(module)


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(component) for component in found)


def test_no_function_level_import_of_the_package():
    inner = [_where(edge) for edge in import_graph() if edge.in_function]
    assert not inner, "function-level imports of sae_dist modules:\n" + "\n".join(inner)


def test_no_import_climbs_a_floor():
    upward = [_where(edge) for edge in import_graph() if floor_of(edge.imported) > floor_of(edge.importer)]
    assert not upward, "imports from a lower floor to a higher one:\n" + "\n".join(upward)


def test_the_graph_reader_finds_what_it_should(tmp_path):
    """The reader on a known file: a relative import, a submodule named by `from package import`, an import in a
    function and one under TYPE_CHECKING (a module-level import like the others)."""
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import run_dir\n"
        "from sae_dist.config import RunConfig\n"
        "if TYPE_CHECKING:\n"
        "    from sae_dist.models.base import SAE\n"
        "def f():\n"
        "    import sae_dist.flops\n"
    )
    modules = {"sae_dist.run_dir", "sae_dist.config", "sae_dist.models.base", "sae_dist.flops"}
    found = {(imp.imported, imp.in_function) for imp in imports_of("sae_dist.m", source, modules)}
    assert found == {("sae_dist.run_dir", False), ("sae_dist.config", False), ("sae_dist.models.base", False),
                     ("sae_dist.flops", True)}
    a_to_b = Import("a", "b", 1, False)
    b_to_a = Import("b", "a", 1, False)
    assert cycles([a_to_b, b_to_a]) == [["a", "b"]]
    assert cycles([a_to_b]) == []


# --- what the training launcher loads ---------------------------------------------------------------------------
_LOADED_AT_EXIT = (
    "import atexit, sys, runpy\n"
    "heavy = {heavy!r}\n"
    "atexit.register(lambda: print('loaded:', ','.join(m for m in heavy if m in sys.modules), file=sys.stderr))\n"
    "sys.argv = ['launch/train.py', *{args!r}]\n"
    "runpy.run_path('launch/train.py', run_name='__main__')\n"
)


def _train(args: list[str]) -> subprocess.CompletedProcess:
    """launch/train.py with `args`; its stderr ends with 'loaded: ' and the HEAVY libraries it imported."""
    code = _LOADED_AT_EXIT.format(heavy=HEAVY, args=args)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _loaded(result: subprocess.CompletedProcess) -> list[str]:
    line = [line for line in result.stderr.splitlines() if line.startswith("loaded:")][-1]
    return [name for name in line.removeprefix("loaded:").strip().split(",") if name]


@pytest.mark.parametrize("bad", ["sae.k=0", "trainer.engine=deepspeed trainer.zero_stage=3", "data.source=web"])
def test_bad_option_is_reported_before_the_heavy_libraries_load(bad):
    result = _train(bad.split())
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[0].startswith("error: "), result.stderr
    assert _loaded(result) == []


TINY_RUN = ["trainer.steps=2", "trainer.batch_size=64", "trainer.log_every=1", "trainer.progress=false",
            "trainer.tensorboard=false", "sae.num_latents=256", "sae.num_experts=4", "sae.k=4"]


def test_a_synthetic_run_trains_without_transformers_or_datasets(tmp_path):
    result = _train(["data=synthetic", *TINY_RUN, f"trainer.out_dir={tmp_path / 'run'}", "data.d_model=32",
                     "data.synthetic_features=64"])
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "checkpoints").is_dir()
    assert _loaded(result) == []


def test_a_cached_run_trains_without_transformers_or_datasets(tmp_path):
    write_cache(SyntheticSource(32, 64, 4, 0.01), tmp_path / "cache", num_tokens=512, shard_tokens=256)
    result = _train(["data=cache", f"data.cache_dir={tmp_path / 'cache'}", "data.shuffle_buffer=256", *TINY_RUN,
                     f"trainer.out_dir={tmp_path / 'run'}"])
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "checkpoints").is_dir()
    assert _loaded(result) == []
