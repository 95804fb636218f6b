"""Conventions shared by the commands in launch/: how they end and what they check before loading anything.

Command lines: every tool but train.py (Hydra) parses its options with `command_parser`: its module docstring as
the help text, each option's default shown in --help, and an unparsable option is one line, exit status 2.

Exit statuses: 2 with one line on stderr for bad input and unusable files (a config value, a missing or damaged
file, a full or read-only disk, a non-finite step, a split or column a dataset does not have; printed once under
torchrun: by rank 0, or by the one rank that met an error alone); 75 (`preemption.REQUEUE_EXIT_STATUS`) for a run
stopped by SIGTERM/SIGUSR1 after writing a checkpoint (none when no step had applied an update); 65
(`nonfinite.NO_UPDATE_EXIT_STATUS`) with one line (printed once) for a run under trainer.on_nonfinite=skip that
skipped 100 steps in a row, or every step up to its last, for NaN or inf; 1 with one line for a collective that
failed because another rank died or stalled (printed by every rank that saw it); 130 with one line (rank 0) for
Ctrl-C (SIGINT), where training names the checkpoint it continues from. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import ast
import errno
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from sae_dist.config import ConfigError, RunConfig
from sae_dist.console import say
from sae_dist.data.source import DataUnavailableError
from sae_dist.host_memory import keep_freed_host_memory
from sae_dist.parallel.failures import CollectiveError, PeerFailedError
from sae_dist.run_dir import (
    CONFIG_FILE,
    MODEL_FILE,
    CheckpointError,
    read_checkpoint_config,
    resolve_checkpoint,
    verify_files,
)
from sae_dist.train.nonfinite import NO_UPDATE_EXIT_STATUS, NoUpdateError
from sae_dist.train.preemption import REQUEUE_EXIT_STATUS, StopRequested
from sae_dist.train.preflight import OutputFolder, check_output_folder
from sae_dist.train.trainer import NonFiniteError
from sae_dist.validation import error_line

USAGE_ERROR_STATUS = 2
INTERRUPTED_EXIT_STATUS = 130
"""128 + SIGINT: what a shell reports for a process that Ctrl-C ended."""
COLLECTIVE_ERROR_STATUS = 1
USER_ERRORS = (ConfigError, DataUnavailableError, CheckpointError, NonFiniteError, PeerFailedError)
"""Errors whose message is the whole story: one line, exit status 2."""
FILE_ERRNOS = (errno.ENOENT, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
               errno.EISDIR, errno.EFBIG)
"""OSErrors about the user's files and disks (missing, full, read-only, not permitted, over the file-size limit),
not bugs."""


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def file_size_limit() -> int | None:
    """This process's file-size limit in bytes (`ulimit -f`), None when unlimited."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if limit == resource.RLIM_INFINITY else limit


def _efbig(limit: int | None) -> str:
    where = f"{limit:,} bytes" if limit is not None else "set"
    return f"File too large (EFBIG: the file-size limit, ulimit -f, is {where})"


def _name_lost_efbig(text: str) -> str:
    """torch.save's writer drops the errno of a failed write, which is then reported as an I/O error; under a
    finite file-size limit the write failed on that limit (Python ignores SIGXFSZ, so the write returns EFBIG)."""
    limit = file_size_limit()
    return text.replace(os.strerror(errno.EIO), _efbig(limit)) if limit is not None else text


def fail(exc: BaseException | str, status: int = USAGE_ERROR_STATUS, every_rank: bool = False) -> NoReturn:
    """Print 'error: ...' (once: see the module docstring) and exit with `status`."""
    report = every_rank or getattr(exc, "report_here", _rank() == 0)
    if report:
        text = error_line(exc) if isinstance(exc, (HydraException, OmegaConfBaseException)) else str(exc)
        say(f"error: {one_line(_name_lost_efbig(text))}")
    sys.exit(status)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's line breaks and shows each option's default (where it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """A launch tool's parser: an option it cannot parse is one line naming it, exit status 2 (not argparse's usage
    block)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


def command_parser(doc: str) -> CommandParser:
    """The parser of a launch tool whose module docstring is `doc`."""
    return CommandParser(description=doc, formatter_class=_HelpFormatter)


def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring, on one line} of a dataclass whose fields carry docstrings (the string literal after a
    field's annotation): the help of each --option, and the meaning column of docs/configuration.md."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def add_config_options(parser: argparse.ArgumentParser, defaults: Any, types: dict[str, type] | None = None) -> None:
    """One --option per field of the dataclass instance `defaults`, its docstring as help, its value as default;
    `types` gives the type of fields whose default is None (otherwise str)."""
    docs = field_docs(type(defaults))
    for name, value in vars(defaults).items():
        flag, text = f"--{name.replace('_', '-')}", docs.get(name, "")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=text)
        else:
            kind = type(value) if value is not None else (types or {}).get(name, str)
            parser.add_argument(flag, type=kind, default=value, help=text)


class Interrupted(Exception):
    """A command ended by Ctrl-C (SIGINT); the message says what was kept and how to go on."""


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn the errors a user can act on into one line and an exit status (see the module docstring)."""
    try:
        yield
    except StopRequested as exc:
        if _rank() == 0:
            say(str(exc))
        sys.exit(REQUEUE_EXIT_STATUS)
    except (Interrupted, KeyboardInterrupt) as exc:
        if _rank() == 0:  # under torchrun every worker gets the agent's SIGINT
            say(f"interrupted by SIGINT{f'; {exc}' if isinstance(exc, Interrupted) else ''}")
        sys.exit(INTERRUPTED_EXIT_STATUS)
    except NoUpdateError as exc:
        fail(exc, NO_UPDATE_EXIT_STATUS)
    except (*USER_ERRORS, HydraException, OmegaConfBaseException) as exc:
        fail(exc)
    except CollectiveError as exc:
        fail(exc, COLLECTIVE_ERROR_STATUS, every_rank=True)
    except (ValueError, KeyError) as exc:
        if not _raised_in_package(exc, "datasets"):
            raise
        fail(f"the dataset refused the request (data.dataset, data.split, data.text_column): {one_line(exc)}")
    except OSError as exc:
        if exc.errno not in FILE_ERRNOS:
            raise
        if exc.errno == errno.EFBIG:
            fail(f"{_efbig(file_size_limit())}: {exc.filename}" if exc.filename else _efbig(file_size_limit()))
        fail(f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc))


def run_hydra_app(app: Callable[[], None]) -> None:
    """Run a `@hydra.main` app (training, caching activations) so that Hydra's own errors (an unknown key, a value
    of the wrong type), which it re-raises with HYDRA_FULL_ERROR, end in one line too; with freed host memory kept
    for reuse (`host_memory`: a CPU's LM forwards then fault no pages in)."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    keep_freed_host_memory()
    with one_line_errors():
        app()


def _raised_in_package(exc: BaseException, package: str) -> bool:
    """Whether `exc` was raised inside `package` (e.g. `datasets` refusing a split or a column it does not have)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and f"{os.sep}{package}{os.sep}" in frames[-1].filename


def check_output(path: str | os.PathLike, option: str) -> OutputFolder:
    """The output folder of a command is writable (nothing is created)."""
    return check_output_folder(Path(path), option)


def say_output(folder: OutputFolder) -> None:
    """Print the output folder with its free disk space (rank 0): once every check has passed, so that a refused
    command prints its error line alone."""
    if _rank() == 0:
        say(f"output folder: {folder.describe()}", sys.stdout)


def check_checkpoint(path: str | os.PathLike) -> tuple[Path, RunConfig]:
    """(checkpoint folder, its run config) of a checkpoint or run folder, its export checked against SHA256SUMS."""
    folder = resolve_checkpoint(path)
    verify_files(folder, [CONFIG_FILE, MODEL_FILE])
    return folder, read_checkpoint_config(folder)[0]


def require_positive(options: dict, *names: str) -> None:
    """Each of the command-line options `names` (argparse dests) is a positive number."""
    for name in names:
        if options[name] is not None and options[name] <= 0:
            fail(f"--{name.replace('_', '-')}={options[name]} must be positive")
