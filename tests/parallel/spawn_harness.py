"""Run many checks in one multi-process spawn (gloo on CPU) and report each check as its own test.

Spawning 4 processes costs seconds, so one spawn runs a whole list of checks. Each rank records the checks it
passed in a file; the first failure ends the spawn (the others are killed, collectives time out after 60 s at
worst). `SpawnResult.require(name)` then fails the test of that check with the first error, and reports checks
after it as not run.
"""

from __future__ import annotations

import os
import socket
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = timedelta(seconds=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Checks:
    """`with checks("name"):` records a passed check for this rank."""

    def __init__(self, folder: Path, rank: int):
        self.path = Path(folder) / f"passed_rank{rank}.txt"
        self.path.touch()

    @contextmanager
    def __call__(self, name: str):
        yield
        with self.path.open("a") as f:
            f.write(name + "\n")


def _entry(rank: int, fn, world: int, port: int, folder: str, job: str, args: tuple) -> None:
    torch.set_num_threads(1)  # 4 ranks share 2 cores
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world),
           "LOCAL_RANK": str(rank)}
    os.environ.update(env)
    from sae_dist.parallel.mesh import init_process_group

    init_process_group("cpu", TIMEOUT)
    try:
        fn(rank, world, Path(folder), Checks(Path(folder) / job, rank), *args)
    except BaseException:
        (Path(folder) / job / f"error_rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


class SpawnResult:
    def __init__(self, folder: Path, world: int, error: str | None):
        self.folder, self.world, self.error = folder, world, error

    def passed(self, name: str) -> bool:
        for rank in range(self.world):
            path = self.folder / f"passed_rank{rank}.txt"
            if not path.exists() or name not in path.read_text().split():
                return False
        return True

    def require(self, name: str) -> None:
        if not self.passed(name):
            raise AssertionError(f"check {name!r} did not pass on every rank; first error:\n{self.error}")


def spawn_checks(fn, world: int, folder: Path, job: str, *args) -> SpawnResult:
    """Run fn(rank, world, folder, checks, *args) on `world` gloo ranks; never raises, see SpawnResult.

    Ranks share `folder` for their data; the checks of this job are recorded under folder / job.
    """
    (folder / job).mkdir(parents=True, exist_ok=True)
    error = None
    try:
        mp.spawn(_entry, args=(fn, world, free_port(), str(folder), job, args), nprocs=world, join=True)
    except Exception as exc:  # the traceback of the first failing rank, written by that rank
        errors = sorted((folder / job).glob("error_rank*.txt"))
        error = errors[0].read_text() if errors else str(exc)
    return SpawnResult(folder / job, world, error)
