"""Train an SAE: `python launch/train.py [+experiment=NAME] [key=value ...]`, or under torchrun.

With no experiment this is the offline quickstart. Bad configuration or unavailable data ends the run at once with
one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from sae_dist.config import ConfigError, to_run_config
from sae_dist.data.source import DataUnavailableError
from sae_dist.train.run import RunDirectoryError, train_from_config

USER_ERRORS = (ConfigError, DataUnavailableError, RunDirectoryError)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run = to_run_config(cfg)
        train_from_config(run)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
