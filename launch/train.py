"""Train an SAE: `python launch/train.py [+experiment=NAME] [key=value ...]`, or under torchrun.

With no experiment this is the offline quickstart. Under torchrun (WORLD_SIZE > 1) every process runs this script;
the experts are sharded over `parallel.ep_size` ranks (docs/expert-parallelism.md), e.g.
    torchrun --nproc_per_node=4 launch/train.py +experiment=quickstart parallel.ep_size=2
Bad configuration or unavailable data ends the run at once with one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from sae_dist.config import ConfigError, to_run_config
from sae_dist.data.source import DataUnavailableError
from sae_dist.parallel.mesh import launched_by_torchrun
from sae_dist.train.run import RunDirectoryError, resolve_device, train_from_config

USER_ERRORS = (ConfigError, DataUnavailableError, RunDirectoryError)


def train_distributed(run) -> None:
    """One rank of a torchrun job: join the process group, agree on the run folder, train, leave."""
    from sae_dist.parallel.expert_parallel import expert_parallel_context
    from sae_dist.parallel.mesh import broadcast_object

    with expert_parallel_context(run, resolve_device(run.trainer.device).type) as ctx:
        # The default folder name holds a timestamp that each rank resolved on its own.
        run.trainer.out_dir = broadcast_object(run.trainer.out_dir)
        train_from_config(run, ctx)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run = to_run_config(cfg)
        if run.trainer.engine == "deepspeed":
            from sae_dist.train.deepspeed_engine import import_deepspeed

            import_deepspeed(resolve_device(run.trainer.device).type)  # a missing install fails here, before any work
        if launched_by_torchrun() or run.trainer.engine == "deepspeed":
            train_distributed(run)
        else:
            train_from_config(run)
    except USER_ERRORS as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
