"""Real full and read-only disks: a small tmpfs mounted in a private mount namespace of a forked child (Linux; as
root, or where unprivileged user namespaces are allowed). Formerly a full disk during a save gave a 72-line
traceback without "No space left on device" and the partial folder kept the disk full; a read-only out_dir was
found only after the model and data were loaded."""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from sae_dist.cli import one_line_errors
from sae_dist.data import build_activation_source
from sae_dist.run_dir import verify_files
from sae_dist.train.run import train_from_config
from tests.conftest import small_run
from tests.train.faults import FaultySource

CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_RDONLY, MS_REC, MS_PRIVATE = 1, 16384, 1 << 18


def _enter_private_tmpfs(mountpoint: Path, size: int, read_only: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(CLONE_NEWNS | (0 if uid == 0 else CLONE_NEWUSER)) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    if uid != 0:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    flags = MS_RDONLY if read_only else 0
    if libc.mount(b"tmpfs", str(mountpoint).encode(), b"tmpfs", flags, f"size={size}".encode()) != 0:
        raise OSError(ctypes.get_errno(), "mount tmpfs")


def on_small_disk(tmp_path: Path, size: int, read_only: bool, fn) -> dict:
    """fn(disk) in a forked child that sees a tmpfs of `size` bytes at `disk` (nobody else does); its JSON result."""
    disk = tmp_path / "disk"
    disk.mkdir()
    result_file = tmp_path / "result.json"
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 0
        try:
            torch.set_num_threads(1)
            try:
                _enter_private_tmpfs(disk, size, read_only)
            except OSError as exc:
                result = {"unavailable": f"{exc.strerror or exc} ({exc.args[-1]})"}
            else:
                result = fn(disk)
            result_file.write_text(json.dumps(result))
        except BaseException as exc:
            result_file.write_text(json.dumps({"crashed": repr(exc)}))
            status = 1
        finally:
            os._exit(status)
    os.waitpid(pid, 0)
    result = json.loads(result_file.read_text())
    if "unavailable" in result:
        pytest.skip(f"no private tmpfs here: {result['unavailable']}")
    assert "crashed" not in result, result["crashed"]
    return result


def run_command(run, source=None) -> dict:
    """train_from_config behind the launchers' error handling: exit status and stderr."""
    err = io.StringIO()
    status = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            with one_line_errors():
                if source is None:
                    train_from_config(run, eval_batches=1)
                else:
                    from sae_dist.train.trainer import Trainer

                    Trainer(run, source).train()
        except SystemExit as exc:
            status = exc.code
    return {"status": status, "err": err.getvalue()}


def test_full_disk_during_a_save(tmp_path):
    """Something else fills the disk after the step-10 checkpoint: the step-20 save fails in one line, its partial
    folder is removed, and the step-10 checkpoint stays complete."""

    def fill_and_train(disk: Path) -> dict:
        run = small_run(disk, steps=20, checkpoint_every=10)

        def fill_disk(x_TD):
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            (disk / "filler").write_bytes(b"\0" * max(free - 64 * 1024, 0))

        outcome = run_command(run, FaultySource(build_activation_source(run), {12: fill_disk}))
        root = disk / "run" / "checkpoints"
        outcome["left"] = sorted(p.name for p in root.iterdir())
        verify_files(root / "step_00000010")
        return outcome

    result = on_small_disk(tmp_path, 4 << 20, False, fill_and_train)
    assert result["status"] == 2, result
    lines = result["err"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write checkpoint step_00000020: No space left")
    assert "the partial checkpoint was removed and step_00000010 is intact" in lines[0]
    assert result["left"] == ["latest", "step_00000010"]


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_loading(tmp_path):
    def train(disk: Path) -> dict:
        run = small_run(disk, steps=20)
        run.sae.num_latents = 4096
        return run_command(run)

    result = on_small_disk(tmp_path, 1 << 20, False, train)
    assert result["status"] == 2
    assert "1.0 MiB free on its disk, about 24.2 MiB needed (3 checkpoints of 8.1 MiB)" in result["err"]


def test_read_only_out_dir_is_refused_before_loading(tmp_path):
    result = on_small_disk(tmp_path, 1 << 20, True, lambda disk: run_command(small_run(disk)))
    assert result["status"] == 2, result
    assert result["err"].strip().endswith("is not writable: Read-only file system (" + str(tmp_path / "disk") + ")")


@pytest.mark.skipif(sys.platform != "linux", reason="Linux mount namespaces")
def test_the_private_disk_is_invisible_outside(tmp_path):
    on_small_disk(tmp_path, 1 << 20, False, lambda disk: {"wrote": (disk / "x").write_text("x")})
    assert not (tmp_path / "disk" / "x").exists()
