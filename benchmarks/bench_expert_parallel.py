"""What does expert parallelism cost? Step time and bytes moved per training step for W = 1, 2, 4 ranks.

W = 1 is the single-device trainer (no communication), run in this process as the baseline; W > 1 are gloo jobs
on CPU (or NCCL with --device cuda, one GPU per rank) with the experts sharded over P ranks (a layout 'W:P'; 'W'
means P = W). Every run trains the same Switch SAE on the same global batch B: each rank holds N / P experts and
B / W tokens, and with P < W the W / P replicas of each expert all-reduce its gradients.

Bytes are those each rank hands to collectives, summed over ranks, per step. The all-to-all rows are compared with
the minimum 2 * B * d * 4 bytes: every token sent to its expert and its reconstruction sent back once (float32).
The backward pass moves the same again; 'remote' is the part that leaves a rank (the rest stays in-process).

With --a2a-chunks 1 4, each W > 1 layout also runs with the token exchange in 4 chunks, each chunk's transfer
overlapping the experts' compute on the one before (`parallel.a2a_chunks`).

    python benchmarks/bench_expert_parallel.py [--layouts 1 2 4 4:2] [--batch 4096] [--d 256] [--latents 16384]
        [--a2a-chunks 1 4]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae_dist.config import DataConfig, RunConfig, SAEConfig, TrainerConfig
from sae_dist.data.synthetic import SyntheticSource
from sae_dist.parallel.context import ParallelContext
from sae_dist.train.init import init_biases_from_batch
from sae_dist.train.step import TrainStep, build_step
from sae_dist.validation import validate

MB = 1e6


def bench_run(args, ep_size: int | None = None, a2a_chunks: int = 1) -> RunConfig:
    run = RunConfig(
        sae=SAEConfig(kind="switch", num_latents=args.latents, num_experts=args.experts, k=args.k),
        data=DataConfig(source="synthetic", d_model=args.d, synthetic_features=4 * args.d, synthetic_active=16),
        trainer=TrainerConfig(batch_size=args.batch, steps=1000, progress=False, tensorboard=False,
                              device=args.device),
    )
    run.parallel.ep_size, run.parallel.a2a_chunks = ep_size, a2a_chunks
    validate(run)
    return run


def time_steps(step: TrainStep, ctx: ParallelContext, args) -> tuple[list[float], dict[str, float]]:
    """Seconds per step (slowest rank) and bytes per step by kind (this rank) over `args.steps` measured steps."""
    run, device = step.run, torch.device(args.device)
    source = SyntheticSource.from_config(run.data, seed=0, rank=ctx.rank)
    x_TD = source.next_batch(ctx.local_batch_size(run.trainer.batch_size)).to(device)
    init_biases_from_batch(step.model, ctx.gather_rows(x_TD))
    stats = getattr(ctx, "stats", None)
    times = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup and stats is not None:
            stats.reset()
        ctx.barrier()
        start = time.perf_counter()
        step(x_TD, 0, 0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(slowest(time.perf_counter() - start, ctx))
    per_step = {} if stats is None else {kind: n / args.steps for kind, n in stats.bytes.items()}
    return times[args.warmup :], per_step


def slowest(seconds: float, ctx: ParallelContext) -> float:
    """The step time of the slowest rank (a step is done when every rank is)."""
    if ctx.world_size == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def rank_main(rank: int, world: int, ep_size: int, chunks: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, args.threads // world))
    from sae_dist.parallel.expert_parallel import ExpertParallelContext

    run = bench_run(args, ep_size, chunks)
    device = torch.device(args.device)
    run.parallel.timeout_s = 120
    ctx = ExpertParallelContext.from_config(run, device.type)
    times, per_step = time_steps(build_step(run, args.d, ctx, device), ctx, args)
    kinds = sorted(per_step)
    totals = ctx.all_reduce_sum(torch.tensor([per_step[k] for k in kinds], dtype=torch.float64))
    if rank == 0:
        queue.put((times, dict(zip(kinds, totals.tolist()))))
    dist.destroy_process_group()


def measure(world: int, ep_size: int, chunks: int, args) -> tuple[list[float], dict[str, float]]:
    if world == 1:
        torch.set_num_threads(args.threads)
        run = bench_run(args)
        ctx = ParallelContext()
        return time_steps(build_step(run, args.d, ctx, args.device), ctx, args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(rank_main, args=(world, ep_size, chunks, port, args, queue), nprocs=world, join=True)
    return queue.get()


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, batch, timing and device options shared by the multi-rank benchmarks."""
    parser.add_argument("--batch", type=int, default=4096, help="global batch B (tokens per step)")
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads shared by all ranks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=["1", "2", "4", "4:2"],
                        help="W or W:P per run (W=1, the baseline, always runs)")
    add_run_arguments(parser)
    parser.add_argument("--a2a-chunks", type=int, nargs="+", default=[1],
                        help="parallel.a2a_chunks values to run for each W > 1 (1 = plain all-to-all)")
    args = parser.parse_args()

    minimum = 2 * args.batch * args.d * 4
    print(f"Switch SAE d={args.d}, M={args.latents}, N={args.experts}, k={args.k}; global batch B={args.batch} "
          f"tokens; {args.device}, {args.threads} CPU threads shared by the ranks; median of {args.steps} steps")
    print(f"minimum all-to-all bytes per step (forward): 2 * B * d * 4 = {minimum / MB:.2f} MB\n")
    header = ("| W | P | a2a chunks | step ms | step vs W=1 | tokens/s | a2a fwd MB | a2a fwd / min | a2a fwd+bwd MB "
              "| of which remote MB | all-reduce MB |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    baseline = None
    runs = [(1, 1, 1)]  # the baseline first
    for layout in args.layouts:
        world, ep_size = (int(v) for v in (layout.split(":") + [layout])[:2])
        runs += [(world, ep_size, chunks) for chunks in args.a2a_chunks if world > 1]
    for world, ep_size, chunks in runs:
        times, per_step = measure(world, ep_size, chunks, args)
        step_s = statistics.median(times)
        baseline = baseline or step_s
        forward = per_step.get("a2a", 0.0)
        both = forward + per_step.get("a2a_backward", 0.0)
        remote = per_step.get("a2a_remote", 0.0) + per_step.get("a2a_backward_remote", 0.0)
        reduce = per_step.get("all_reduce", 0.0)
        print(f"| {world} | {ep_size if world > 1 else '-'} | {chunks if world > 1 else '-'} | {step_s * 1e3:.1f} "
              f"| {step_s / baseline:.2f}x "
              f"| {args.batch / step_s:,.0f} | {forward / MB:.2f} | {forward / minimum:.2f} | {both / MB:.2f} "
              f"| {remote / MB:.2f} | {reduce / MB:.2f} |", flush=True)


if __name__ == "__main__":
    main()
