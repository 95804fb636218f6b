"""Each line a command prints to the job's log is one write: the ranks of a torchrun job share the log, and with an
unbuffered stderr (PYTHONUNBUFFERED=1) print()'s two writes let another rank's line in between (seen: two ranks'
collective errors on one line, 'Connection reset by peererror: collective ...')."""

from __future__ import annotations

import io
import sys

import pytest

from sae_dist.cli import one_line_errors
from sae_dist.parallel.failures import CollectiveError
from sae_dist.train.preemption import StopRequested


class Writes(io.StringIO):
    """A stream that records each write."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def test_an_error_line_is_one_write(monkeypatch):
    monkeypatch.setenv("RANK", "1")  # a collective error is said by every rank
    stderr = Writes()
    monkeypatch.setattr(sys, "stderr", stderr)
    with pytest.raises(SystemExit) as exit_info, one_line_errors():
        raise CollectiveError("collective all_to_all_single failed on rank 1 during step 10")
    assert stderr.calls == ["error: collective all_to_all_single failed on rank 1 during step 10\n"]
    assert exit_info.value.code == 1


def test_a_stop_line_is_one_write(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "0")
    stderr = Writes()
    monkeypatch.setattr(sys, "stderr", stderr)
    with pytest.raises(SystemExit), one_line_errors():
        raise StopRequested("SIGUSR1", 7, None, out_dir=tmp_path)
    assert len(stderr.calls) == 1 and stderr.calls[0].startswith("stopped by SIGUSR1 after step 7")
    assert stderr.calls[0].endswith("continues the run\n")
