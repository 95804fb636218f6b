"""Conventions shared by the commands in launch/: how they end and what they check before loading anything.

Exit statuses: 2 with one line on stderr for bad input and unusable files (a config value, a missing or damaged
file, a full or read-only disk, a non-finite step, a split or column a dataset does not have; printed once under
torchrun: by rank 0, or by the one rank that met an error alone); 75 (`preemption.REQUEUE_EXIT_STATUS`) for a run
stopped by SIGTERM/SIGUSR1 after writing a checkpoint; 1 with one line for a collective that failed because another
rank died or stalled (printed by every rank that saw it). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from sae_dist.config import ConfigError, RunConfig, error_line
from sae_dist.data.source import DataUnavailableError
from sae_dist.parallel.failures import CollectiveError, PeerFailedError
from sae_dist.run_dir import (
    CONFIG_FILE,
    MODEL_FILE,
    CheckpointError,
    read_checkpoint_config,
    resolve_checkpoint,
    verify_files,
)
from sae_dist.train.preemption import REQUEUE_EXIT_STATUS, StopRequested
from sae_dist.train.preflight import OutputFolder, check_inputs, check_output_folder
from sae_dist.train.trainer import NonFiniteError

USAGE_ERROR_STATUS = 2
COLLECTIVE_ERROR_STATUS = 1
USER_ERRORS = (ConfigError, DataUnavailableError, CheckpointError, NonFiniteError, PeerFailedError)
"""Errors whose message is the whole story: one line, exit status 2."""
FILE_ERRNOS = (errno.ENOENT, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
               errno.EISDIR)
"""OSErrors about the user's files and disks (missing, full, read-only, not permitted), not bugs."""


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def fail(exc: BaseException | str, status: int = USAGE_ERROR_STATUS, every_rank: bool = False) -> NoReturn:
    """Print 'error: ...' (once: see the module docstring) and exit with `status`."""
    report = every_rank or getattr(exc, "report_here", _rank() == 0)
    if report:
        text = error_line(exc) if isinstance(exc, (HydraException, OmegaConfBaseException)) else str(exc)
        print(f"error: {one_line(text)}", file=sys.stderr, flush=True)
    sys.exit(status)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn the errors a user can act on into one line and an exit status (see the module docstring)."""
    try:
        yield
    except StopRequested as exc:
        if _rank() == 0:
            print(exc, file=sys.stderr, flush=True)
        sys.exit(REQUEUE_EXIT_STATUS)
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
        fail(f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc))


def _raised_in_package(exc: BaseException, package: str) -> bool:
    """Whether `exc` was raised inside `package` (e.g. `datasets` refusing a split or a column it does not have)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and f"{os.sep}{package}{os.sep}" in frames[-1].filename


def check_output(path: str | os.PathLike, option: str) -> OutputFolder:
    """The output folder of a command is writable (nothing is created); print it with its free disk space."""
    folder = check_output_folder(Path(path), option)
    if _rank() == 0:
        print(f"output folder: {folder.describe()}", flush=True)
    return folder


def check_checkpoint(path: str | os.PathLike) -> tuple[Path, RunConfig]:
    """(checkpoint folder, its run config) of a checkpoint or run folder, its export checked against SHA256SUMS."""
    folder = resolve_checkpoint(path)
    verify_files(folder, [CONFIG_FILE, MODEL_FILE])
    return folder, read_checkpoint_config(folder)[0]


def check_inspection(checkpoint: str | os.PathLike, latents: list[int] | None) -> None:
    """What inspect_features.py and autointerp.py read: the checkpoint, the --latents ids in it, and the model and
    text its activations came from."""
    from sae_dist.eval.inspect import text_run_config

    _, run = check_checkpoint(checkpoint)
    num_latents = run.sae.num_latents
    for latent in latents or []:
        if not 0 <= latent < num_latents:
            fail(f"--latents {latent} is not a latent of this SAE (allowed: 0 to {num_latents - 1})")
    check_inputs(text_run_config(run))


def require_positive(options: dict, *names: str) -> None:
    """Each of the command-line options `names` (argparse dests) is a positive number."""
    for name in names:
        if options[name] is not None and options[name] <= 0:
            fail(f"--{name.replace('_', '-')}={options[name]} must be positive")
