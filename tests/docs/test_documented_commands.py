"""Every command the README and docs/ show runs as written: the training and caching commands compose and validate
their configuration (nothing is trained), and the other launch scripts accept every option they are shown with."""

from __future__ import annotations

import argparse
import runpy
import sys
from collections import Counter

import pytest
from documented_commands import ROOT, documented_commands, flags, hydra_overrides, world_size
from hydra_compose import compose_config, compose_run

from sae_dist.parallel.mesh import validate_layout
from sae_dist.validation import to_cache_job_config

COMMANDS = documented_commands()
HYDRA_APPS = {"launch/train.py", "launch/cache_activations.py"}


def test_the_pages_document_commands_of_every_kind():
    """The collection itself: a page rewritten so that no command is found would pass the checks below vacuously."""
    scripts = Counter(c.script for c in COMMANDS)
    assert scripts["launch/train.py"] >= 20 and scripts["launch/cache_activations.py"] >= 4
    assert {"launch/evaluate.py", "launch/analyze.py", "launch/plot.py", "launch/inspect_features.py",
            "launch/autointerp.py", "launch/export.py"} <= set(scripts)
    assert any(c.launcher == "torchrun" for c in COMMANDS)
    assert all((ROOT / c.script).is_file() for c in COMMANDS), [str(c) for c in COMMANDS
                                                                  if not (ROOT / c.script).is_file()]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.script == "launch/train.py"], ids=str)
def test_training_command_composes_and_validates(command):
    overrides, launchers = hydra_overrides(command.args)
    run = compose_run(overrides)
    validate_layout(run, world_size(command))
    for launcher in launchers:
        assert (ROOT / "conf/hydra/launcher" / f"{launcher}.yaml").is_file(), launcher


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.script == "launch/cache_activations.py"], ids=str)
def test_cache_command_composes_and_validates(command):
    overrides, _ = hydra_overrides(command.args)
    to_cache_job_config(compose_config(overrides, config_name="cache_activations"))


class _Parsed(BaseException):
    """Raised in place of parsing, to hand a script's parser back (BaseException: no `except Exception` catches it)."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


def script_options(script: str, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every option string of the parser that `script` builds when run as a command."""

    def hand_back(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", hand_back)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", hand_back)
    monkeypatch.setattr(sys, "argv", [script])
    with pytest.raises(_Parsed) as parsed:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return {option for action in parsed.value.parser._actions for option in action.option_strings}


OTHER_SCRIPTS = sorted({c.script for c in COMMANDS} - HYDRA_APPS)


@pytest.mark.parametrize("script", OTHER_SCRIPTS)
def test_every_documented_option_exists(script, monkeypatch):
    options = script_options(script, monkeypatch)
    used = {(flag, str(c)) for c in COMMANDS if c.script == script for flag in flags(c.args)}
    unknown = sorted(f"{flag} in {where}" for flag, where in used if flag not in options)
    assert not unknown, unknown
