"""Train an SAE: `python launch/train.py [+experiment=NAME] [key=value ...]`, or under torchrun.

With no experiment this is the offline quickstart. Under torchrun (WORLD_SIZE > 1) every process runs this script;
the experts are sharded over `parallel.ep_size` ranks (docs/expert-parallelism.md), e.g.
    torchrun --nproc_per_node=4 launch/train.py +experiment=quickstart parallel.ep_size=2
A run folder that already holds the run continues it (trainer.resume=auto), so a torchrun restart or a SLURM
requeue running the same command resumes from the latest checkpoint.

Exit statuses (sae_dist/cli.py): 0 done; 2 bad input, or a run folder in use by another command, with one line on
stderr before any model or data is loaded; 75 stopped by SIGTERM or SIGUSR1 after writing a checkpoint (the same
command with its trainer.out_dir continues), also when torchrun's agent is gone; 130 Ctrl-C (SIGINT), with one line
naming the checkpoint the same command continues from; 1 a collective failed because another rank died or stalled. A
multirun (-m) is checked whole before its first job (sae_dist/multirun_check.py).
"""

from __future__ import annotations

import os
from datetime import timedelta

import hydra
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sae_dist.cli import one_line_errors, run_hydra_app
from sae_dist.config import RunConfig, register_configs
from sae_dist.launch_guards import check_resumed_width, hold_folder, interrupted, watch_launcher
from sae_dist.parallel.expert_parallel import ExpertParallelContext
from sae_dist.parallel.failures import on_every_rank
from sae_dist.parallel.mesh import broadcast_object, init_process_group, launched_by_torchrun, validate_layout
from sae_dist.train.deepspeed_engine import import_deepspeed
from sae_dist.train.multi import prepare_sweep, train_sweep
from sae_dist.train.preflight import check_device
from sae_dist.train.run import prepare_run, train_from_config, train_planned
from sae_dist.validation import to_run_config


def train_distributed(run: RunConfig, overrides: list[str]) -> None:
    """One rank of a torchrun job: check the layout, join the process group, agree on the run folder and the run's
    config, build the expert-parallel context from that config, train, leave."""
    world = int(os.environ.get("WORLD_SIZE", "1"))  # 1: the DeepSpeed engine in one process
    watch_launcher(run)
    validate_layout(run, world)
    device = check_device(run.trainer.device)
    init_process_group(device.type, timedelta(seconds=run.parallel.timeout_s))
    try:
        # Ranks on other nodes may have resolved the default folder's stamp otherwise.
        run.trainer.out_dir = broadcast_object(run.trainer.out_dir)
        with hold_folder(run.trainer.out_dir, "trainer.out_dir"):
            on_every_rank(lambda: check_resumed_width(run, overrides))
            if run.sweep:
                plans = on_every_rank(lambda: prepare_sweep(run, world, overrides))
                train_sweep(plans, ExpertParallelContext.from_config(plans[0].run, plans[0].device.type))
            else:
                plan = on_every_rank(lambda: prepare_run(run, world, overrides))
                train_planned(plan, ExpertParallelContext.from_config(plan.run, plan.device.type))
    finally:
        dist.destroy_process_group()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    with one_line_errors():
        run = to_run_config(cfg)
        overrides = list(HydraConfig.get().overrides.task)
        if run.trainer.engine == "deepspeed":
            import_deepspeed(check_device(run.trainer.device).type)  # a missing install fails here, before any work
        try:
            if launched_by_torchrun() or run.trainer.engine == "deepspeed":
                train_distributed(run, overrides)
            else:
                with hold_folder(run.trainer.out_dir, "trainer.out_dir"):
                    check_resumed_width(run, overrides)
                    train_from_config(run, overrides=overrides)
        except KeyboardInterrupt:
            raise interrupted(run) from None


def main() -> None:
    register_configs()
    run_hydra_app(hydra_main)


if __name__ == "__main__":
    main()
