"""What does the DeepSpeed engine cost and save? Step time and optimizer memory per rank, torch engine vs ZeRO 1 / 2.

Every run is a W-rank job (gloo on CPU, or NCCL with --device cuda, one GPU per rank) training the same Switch SAE on
the same global batch with the experts sharded over P ranks (layout 'W:P'), once per engine. The step time is the
slowest rank's, median of --steps steps after --warmup. Optimizer memory is what one rank holds for Adam: its moments
and, for DeepSpeed, its fp32 master partition (the model's own parameters come on top for both engines). Its floor
is ZeRO's ideal: the moments of this rank's parameters split evenly over the ranks that hold them.

    python benchmarks/bench_engines.py [--layouts 2 2:1] [--batch 4096] [--d 256] [--latents 16384]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_expert_parallel import add_run_arguments, bench_run, time_steps
from rich import box
from rich.console import Console
from rich.table import Table

from sae_dist.data.synthetic import SyntheticSource
from sae_dist.models.base import is_expert_sharded
from sae_dist.train.run import build_trainer

MB = 1e6
ENGINES = [("torch", None), ("deepspeed", 1), ("deepspeed", 2)]


def adam_bytes(trainer) -> tuple[float, float]:
    """(bytes of Adam's state this rank holds, ZeRO's floor for it): moments, steps, DeepSpeed's fp32 masters."""
    if trainer.run.trainer.engine == "deepspeed":
        zero = trainer.optimizer
        tensors = [t for state in zero.optimizer.state.values() for t in state.values()]
        tensors += list(zero.single_partition_of_fp32_groups)
    else:
        tensors = [t for state in trainer.optimizer.state.values() for t in state.values()]
    held = sum(t.numel() * t.element_size() for t in tensors)
    replicas = {True: trainer.ctx.expert_replicas, False: trainer.ctx.world_size}
    model = trainer.model
    floor = sum(2 * 4 * p.numel() / replicas[is_expert_sharded(model, name)] for name, p in model.named_parameters())
    return held, floor


def rank_main(rank: int, world: int, ep_size: int, engine: str, stage: int | None, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, args.threads // world))
    from sae_dist.parallel.expert_parallel import ExpertParallelContext

    run = bench_run(args, ep_size)
    run.trainer.engine, run.trainer.zero_stage = engine, stage or 1
    device = torch.device(args.device)
    run.parallel.timeout_s = 300
    ctx = ExpertParallelContext.from_config(run, device.type)
    trainer = build_trainer(run, SyntheticSource.from_config(run.data, 0, rank), ctx, device)
    times, _ = time_steps(trainer, ctx, args)
    held, floor = adam_bytes(trainer)
    if rank == 0:
        queue.put((times, held, floor))
    dist.destroy_process_group()


def measure(world: int, ep_size: int, engine: str, stage: int | None, args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(rank_main, args=(world, ep_size, engine, stage, port, args, queue), nprocs=world, join=True)
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=["2", "2:1"], help="W or W:P per run (W > 1)")
    add_run_arguments(parser)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", args.device)

    table = Table(box=box.MARKDOWN, title=(
        f"Switch SAE d={args.d}, M={args.latents}, N={args.experts}, k={args.k}; B={args.batch} tokens; "
        f"{args.device}, {args.threads} CPU threads shared by the ranks; median of {args.steps} steps"))
    for column in ("W", "P", "engine", "step ms", "vs torch engine", "tokens/s", "Adam state MB/rank",
                   "floor MB/rank"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for layout in args.layouts:
        world, ep_size = (int(v) for v in (layout.split(":") + [layout])[:2])
        baseline = None
        for engine, stage in ENGINES:
            times, held, floor = measure(world, ep_size, engine, stage, args)
            step_s = statistics.median(times)
            baseline = baseline or step_s
            name = engine if stage is None else f"{engine} ZeRO-{stage}"
            table.add_row(str(world), str(ep_size), name, f"{step_s * 1e3:.1f}", f"{step_s / baseline:.2f}x",
                          f"{args.batch / step_s:,.0f}", f"{held / MB:.2f}", f"{floor / MB:.2f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
