"""Running the launch/ commands in this process, as a user would from the shell (argv in, exit status and output
out), with every loader of models and data replaced by a tripwire: a check that must come before any loading
fails its test if the command gets that far."""

from __future__ import annotations

import runpy
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Outcome:
    status: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    def one_line_error(self, *fragments: str) -> str:
        """Assert exit status 2, exactly one stderr line 'error: ...' holding every fragment and nothing on stdout;
        return the line."""
        assert self.status == 2, (self.status, self.err[-2000:])
        assert len(self.error_lines) == 1, self.err
        assert self.out == "", f"printed before its error: {self.out[-2000:]}"
        line = self.error_lines[0]
        assert line.startswith("error: "), line
        for fragment in fragments:
            assert fragment in line, line
        return line


class LoadedSomething(AssertionError):
    pass


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a language model, text, an activation source or an SAE fails the test."""

    def tripwire(*args, **kwargs):
        raise LoadedSomething("the command loaded a model or data before refusing its input")

    import sae_dist.api
    import sae_dist.data.lm
    import sae_dist.eval.evaluate
    import sae_dist.eval.inspect
    import sae_dist.train.plan

    monkeypatch.setattr(sae_dist.train.plan, "build_activation_source", tripwire)
    for module in (sae_dist.api, sae_dist.eval.evaluate, sae_dist.eval.inspect):
        monkeypatch.setattr(module, "load_sae", tripwire)
    for module in (sae_dist.data.lm, sae_dist.api, sae_dist.eval.evaluate, sae_dist.eval.inspect):  # bound by name
        monkeypatch.setattr(module, "load_lm", tripwire)


@pytest.fixture
def command(monkeypatch, capsys):
    """command('train.py', *args) runs launch/train.py in this process; returns its Outcome."""

    def run(script: str, *args: str) -> Outcome:
        monkeypatch.setattr(sys, "argv", [script, *args])
        status = 0
        try:
            runpy.run_path(str(ROOT / "launch" / script), run_name="__main__")
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        finally:
            GlobalHydra.instance().clear()
        captured = capsys.readouterr()
        return Outcome(status, captured.out, captured.err)

    return run
