"""The commands that README.md and docs/*.md show in fenced code blocks, as a user would type them.

A command is a line (with its `\\` continuations) whose program is `python`/`python3` or `torchrun` and whose script is
under `launch/`. Shell variables assigned earlier in the same block (`SP=...`) are expanded, comments dropped, and
placeholders the docs use for a user's own paths are filled in (`PLACEHOLDERS`).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "index.md")]
"""Where commands are documented (docs/index.md is the README, copied there by `make docs`)."""
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
"""A fenced block and its language."""
SHELL = ("bash", "sh", "shell", "console", "")
"""The blocks that hold commands: shell, or no stated language (those also hold output, which holds no command)."""
COMMAND_START = re.compile(r"^\s*(?:[A-Z_][A-Z0-9_]*=\S+\s+)*(?:python3?|torchrun)\s")
ASSIGNMENT = re.compile(r"^([A-Z_][A-Z0-9_]*)=(\S+)$")
PLACEHOLDERS = {
    "<date>_<time>": "2026-01-01_00-00-00",
    "[...]": "[a.txt]",
}
"""Text a page writes for a value of the user's own, and what stands in for it."""


@dataclass(frozen=True)
class Command:
    page: str
    line: str
    launcher: str
    """'python' or 'torchrun'."""
    launcher_args: tuple[str, ...]
    """torchrun's own arguments (`--nproc_per_node=8`, ...)."""
    script: str
    """The script's path relative to the repository, e.g. 'launch/train.py'."""
    args: tuple[str, ...]
    """Everything after the script."""

    def __str__(self) -> str:
        return f"{self.page}: {self.line}"


def _logical_lines(block: str) -> list[str]:
    """The block's lines with `\\` continuations joined."""
    return block.replace("\\\n", " ").splitlines()


def _expand(line: str, variables: dict[str, str]) -> str:
    for name, value in variables.items():
        line = line.replace(f"${name}", value)
    for placeholder, value in PLACEHOLDERS.items():
        line = line.replace(placeholder, value)
    return line


def _command(page: str, line: str, tokens: list[str]) -> Command | None:
    while tokens and ASSIGNMENT.match(tokens[0]):  # OMP_WAIT_POLICY=PASSIVE python ...
        tokens = tokens[1:]
    if not tokens or tokens[0] not in ("python", "python3", "torchrun"):
        return None
    scripts = [i for i, token in enumerate(tokens) if token.startswith("launch/") and token.endswith(".py")]
    if not scripts:
        return None
    i = scripts[0]
    launcher = "torchrun" if tokens[0] == "torchrun" else "python"
    return Command(page, line.strip(), launcher, tuple(tokens[1:i]), tokens[i], tuple(tokens[i + 1:]))


def documented_commands() -> list[Command]:
    """Every launch command in a fenced code block of the README and the docs pages."""
    commands = []
    for path in PAGES:
        page = str(path.relative_to(ROOT))
        for language, block in FENCE.findall(path.read_text()):
            if language not in SHELL:
                continue
            variables: dict[str, str] = {}
            for line in _logical_lines(block):
                if not (COMMAND_START.match(line) or ASSIGNMENT.match(line.strip())):
                    continue  # output, or a command of another program (make, sbatch, docker)
                tokens = shlex.split(_expand(line, variables), comments=True)
                if len(tokens) == 1 and ASSIGNMENT.match(tokens[0]):
                    name, value = ASSIGNMENT.match(tokens[0]).groups()
                    variables[name] = value
                    continue
                command = _command(page, line, tokens)
                if command is not None:
                    commands.append(command)
    return commands


def hydra_overrides(args: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(overrides to compose, names of Hydra launcher configs chosen) from a Hydra app's arguments.

    Hydra's own flags (`-m`, `--cfg job`) are dropped; a multirun sweep `key=a,b` composes its first value; choices of
    Hydra's own config (`hydra/launcher=slurm`, `hydra.launcher.*`) are returned apart, as compose does not take them.
    """
    overrides, launchers = [], []
    skip_next = False
    for arg in args:
        if skip_next:
            skip_next = False
            continue
        if arg in ("-m", "--multirun"):
            continue
        if arg in ("--cfg", "-c"):
            skip_next = True
            continue
        if arg.startswith("hydra/launcher="):
            launchers.append(arg.split("=", 1)[1])
            continue
        if arg.startswith("hydra."):
            continue
        key, is_override, value = arg.partition("=")
        if is_override and "," in value and not value.startswith(("[", "{", "'", '"')):
            arg = f"{key}={value.split(',', 1)[0]}"
        overrides.append(arg)
    return overrides, launchers


def world_size(command: Command) -> int:
    """The number of ranks a torchrun command starts (1 for python)."""
    if command.launcher != "torchrun":
        return 1
    options = dict(arg.lstrip("-").split("=", 1) for arg in command.launcher_args if "=" in arg)
    per_node = int(options.get("nproc_per_node", options.get("nproc-per-node", "1")))
    return per_node * int(options.get("nnodes", "1"))


def flags(args: tuple[str, ...]) -> list[str]:
    """The `--options` among a command's arguments (`--out=x` as `--out`; an optional `[--batches 20]` as
    `--batches`)."""
    options = (arg.lstrip("[") for arg in args)
    return [option.split("=", 1)[0].rstrip("]") for option in options if option.startswith("--")]
