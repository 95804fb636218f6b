"""The one place the docs tests ask Hydra for a run configuration, as `launch/train.py` composes it: the schema is
registered first (`register_configs`), as the launchers do, since importing `sae_dist.config` registers nothing."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from sae_dist.config import ConfigError, RunConfig, register_configs
from sae_dist.validation import error_line, to_run_config

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose_config(overrides: list[str], config_name: str = "config") -> DictConfig:
    """conf/<config_name>.yaml with `overrides`, unresolved (Hydra's errors as one-line ConfigErrors)."""
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(error_line(exc)) from None


def compose_run(overrides: list[str]) -> RunConfig:
    """The typed, validated run that `python launch/train.py OVERRIDES` would train (nothing is loaded)."""
    return to_run_config(compose_config(overrides))
