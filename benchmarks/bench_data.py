"""Does the job run at the speed of its slowest stage? Tokens/s of each data stage alone and of the whole job.

Stages, each measured alone on this machine: tokenising text into contexts (`Tokenization`, in this thread and
in worker processes), the LM forward up to the hooked block (`LMUnitReader.fill`, batches of `lm_batch_size`
contexts), reading a bfloat16 cache (`CachedActivationSource.next_batch`), and the SAE training step
(`step.TrainStep`). Then the whole job (`Trainer.train`, steady-state tokens/s from its metrics windows) on
the LM source without and with prefetch (and once more with glibc's default malloc: everything else runs with
freed host memory kept, as the launch commands run, `sae_dist/host_memory.py`), and on the cache. The job's ratio
is against its slowest stage; floors
are the machine's measured GEMM rate divided by the stage's FLOPs per token, and its measured copy bandwidth
for the cache. On a CPU both stages share the same cores: a job that only time-shares them runs at the serial
bound 1 / (1/LM + 1/SAE), and above it where a stage alone leaves a core idle; the table shows the job against it.

    python benchmarks/bench_data.py [--lm minilm|gpt2] [--device cpu|cuda] [--steps 40] [--batch 8192]

With eai-sparsify installed (`pip install -e ".[bench]"`) the table ends with the peer: sparsify's training job on
the same model, site and text with a dense TopK SAE of the same width, beside this project's job with that SAE.

`--lm gpt2` is a randomly initialised GPT-2 small (it costs what the real one costs; no weights are downloaded)
read at block 8 with the bundled MiniLM tokenizer (no GPT-2 tokenizer files ship offline), and the paper's
Switch SAE (M = 65,536, N = 8, k = 32); `--lm minilm` is the offline quickstart (MiniLM block 3, M = 6,144).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
from bench_step import machine
from datasets import Dataset
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer, GPT2Config, GPT2Model

from sae_dist.config import DataConfig, ModelConfig, RunConfig, SAEConfig, TrainerConfig
from sae_dist.data import CachedActivationSource, lm_activation_source, load_lm, pretokenize_processes, write_cache
from sae_dist.data.shuffle import BlockShuffleSource
from sae_dist.data.source import ActivationSource
from sae_dist.data.text import Documents, load_text_dataset
from sae_dist.data.tokenize import PretokenizedContexts, Tokenization
from sae_dist.flops import flops_per_token
from sae_dist.host_memory import keep_freed_host_memory
from sae_dist.train.init import init_biases_from_batch
from sae_dist.train.step import build_step
from sae_dist.train.trainer import Trainer
from sae_dist.validation import validate


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """CPU time of this process, all threads (child processes such as tokeniser workers not included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Rate(NamedTuple):
    wall: float
    """tokens/s"""
    cpu: float
    """tokens per CPU-second of this process: robust to other processes sharing the cores."""


def timed(work, tokens: int, device: torch.device, repeats: int = 3) -> Rate:
    """Best tokens/s and tokens per CPU-s of `work()` (which processes `tokens` tokens) over `repeats` runs
    after one warm-up."""
    work()
    synchronize(device)
    wall = cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), cpu_seconds()
        work()
        synchronize(device)
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, cpu_seconds() - start_cpu)
    return Rate(tokens / wall, tokens / cpu)


def rate(work, tokens: int, device: torch.device, repeats: int = 3) -> float:
    return timed(work, tokens, device, repeats).wall


def gemm_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul: the machine's practical GEMM peak."""
    n = 4096 if device.type == "cuda" else 1536
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return rate(lambda: a @ b, 2 * n**3, device)


def copy_bandwidth(device: torch.device) -> float:
    """Measured bytes/s of copying 256 MiB (read + write counted once each)."""
    src = torch.empty(2**28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return rate(lambda: dst.copy_(src), 2 * src.numel(), device)


def machine_line(device: torch.device) -> str:
    """The GPU's name, or the CPU with its threads and the load at the time (`bench_step.machine`)."""
    return machine(device) if device.type == "cuda" else f"{machine(device)}, load {os.getloadavg()[0]:.1f}"


def lm_flops_per_token(model, layer: int, ctx_len: int) -> float:
    """2 x parameters of the blocks up to `layer` plus attention scores and mixing (4 * ctx_len * d per block)."""
    blocks = sum(p.numel() for block in list(model.h if hasattr(model, "h") else model.encoder.layer)[: layer + 1]
                 for p in block.parameters())
    return 2 * blocks + (layer + 1) * 4 * ctx_len * model.config.hidden_size


def random_gpt2(folder: Path, tokenizer) -> str:
    """GPT-2 small with random weights and the MiniLM tokenizer, saved to `folder`."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.cls_token_id,
                        eos_token_id=tokenizer.sep_token_id)
    GPT2Model(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def base_run(args, workdir: Path) -> RunConfig:
    if args.lm == "minilm":
        model = ModelConfig(name="minilm-bundled", layer=3)
        sae = SAEConfig(num_latents=6144, num_experts=8, k=32)
    else:
        tokenizer = (AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer
                     else load_lm(ModelConfig(name="minilm-bundled"))[1])
        model = ModelConfig(name="gpt2-random", path=random_gpt2(workdir / "gpt2", tokenizer), layer=8)
        sae = SAEConfig(num_latents=65536, num_experts=8, k=32)
    data = DataConfig(dataset="python-docs", streaming=False, lm_batch_size=args.lm_batch, shuffle_buffer=args.buffer,
                      tokenizer_workers=0)
    trainer = TrainerConfig(batch_size=args.batch, steps=args.steps, log_every=args.log_every,
                            checkpoint_every=10**9, device=args.device, progress=False, tensorboard=False,
                            dtype="bfloat16" if args.device == "cuda" else "float32", out_dir=str(workdir / "run"))
    run = RunConfig(sae=sae, model=model, data=data, trainer=trainer)
    validate(run)
    return run


def tokenise_rate(run: RunConfig, tokenizer, workers: int, documents: int, pretokenized: bool = False) -> Rate:
    """Contexts per second of `documents` documents: tokenised in this thread or `workers` processes, or read from
    the dataset pretokenised (data.pretokenize) once beforehand."""
    docs = Documents(load_text_dataset(run.data), run.data.text_column)
    tokenization = (PretokenizedContexts(docs.dataset, tokenizer, run.data.ctx_len, run.data.text_column, workers)
                    if pretokenized else Tokenization(tokenizer, run.data.ctx_len, workers))
    units = list(range(documents))

    def work() -> int:
        return sum(len(c) for _, contexts in tokenization.contexts(docs, iter(units)) for c in contexts)

    tokens = work()
    result = timed(work, tokens, torch.device("cpu"), repeats=2)
    tokenization.close()
    return result


def lm_rate(source: BlockShuffleSource, tokens: int, device: torch.device) -> Rate:
    reader = source.reader
    prepared, rows = [], 0
    for unit in reader.prepare(iter(range(10**9))):
        prepared.append(unit)
        rows += unit.rows
        if rows >= tokens:
            break
    out_ND = torch.empty(rows, reader.d_model, dtype=reader.dtype, device=device)
    return timed(lambda: list(reader.fill(prepared, out_ND)), rows, device, repeats=2)


def sae_step_rate(run: RunConfig, d_model: int, device: torch.device) -> Rate:
    source = ConstantSource(torch.randn(run.trainer.batch_size, d_model, device=device) * 3)
    step = build_step(run, d_model, device=device)
    x_TD = source.next_batch(run.trainer.batch_size)
    init_biases_from_batch(step.model, x_TD)
    return timed(lambda: step(x_TD, 0, 0), run.trainer.batch_size, device, repeats=5)


class ConstantSource(ActivationSource):
    def __init__(self, x_TD: torch.Tensor) -> None:
        self.x_TD, self.d_model = x_TD, x_TD.shape[1]

    def next_batch(self, batch_size: int) -> torch.Tensor:
        return self.x_TD[:batch_size]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def job_rate(run: RunConfig, source: ActivationSource, device: torch.device, out_dir: Path) -> Rate:
    """Tokens/s and tokens per CPU-s of the training loop from the end of its first metrics window (which holds
    the first shuffle block's fill and warm-up) to the step before its last (whose final checkpoint write, seconds
    at GPU step rates, is no part of the steady state)."""
    run = replace(run, trainer=replace(run.trainer, out_dir=str(out_dir)))
    trainer = Trainer(run, source, device=device)
    first, last = run.trainer.log_every, run.trainer.steps - 1
    marks: list[tuple[float, float]] = []
    for step in trainer.steps():
        if step in (first, last):
            synchronize(device)
            marks.append((time.perf_counter(), cpu_seconds()))
    source.close()
    tokens = (last - first) * run.trainer.batch_size
    (wall_0, cpu_0), (wall_1, cpu_1) = marks
    return Rate(tokens / (wall_1 - wall_0), tokens / (cpu_1 - cpu_0))


def packed_sequences(run: RunConfig, tokenizer) -> Dataset:
    """The text as one token stream (each document after a separator token) cut into rows of ctx_len tokens: what
    sparsify's `chunk_and_tokenize` makes, which returned a single row under transformers 5.17 (a GPU image's)."""
    texts = list(load_text_dataset(run.data)[run.data.text_column])
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    stream = [token for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
              for token in (separator, *ids)]
    rows = len(stream) // run.data.ctx_len
    ids_RT = torch.tensor(stream[: rows * run.data.ctx_len]).view(rows, run.data.ctx_len)
    return Dataset.from_dict({"input_ids": ids_RT.numpy()}).with_format("torch")


def sparsify_rate(run: RunConfig, model, tokenizer, steps: int, out_dir: Path) -> Rate:
    """EleutherAI's sparsify on the same model, site and text: a dense TopK SAE of the same width and k trained
    inside the hook of a full LM forward per batch (its design: no shuffle buffer, nothing overlapped). Steady
    state from two runs of different lengths; batches of batch_size / ctx_len sequences."""
    if run.trainer.device != "cuda":  # its Triton decoder, imported whenever Triton is installed, needs a GPU driver
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SaeConfig, TrainConfig
    from sparsify import Trainer as SparsifyTrainer

    sequences = packed_sequences(run, tokenizer)
    per_batch = run.trainer.batch_size // run.data.ctx_len
    hookpoint = f"{'h' if hasattr(model, 'h') else 'encoder.layer'}.{run.model.layer}"

    def fit(batches: int) -> tuple[float, float]:
        cfg = TrainConfig(SaeConfig(num_latents=run.sae.num_latents, k=run.sae.k), batch_size=per_batch,
                          hookpoints=[hookpoint], save_every=10**9, log_to_wandb=False, save_dir=str(out_dir))
        rows = [i % len(sequences) for i in range(batches * per_batch)]  # epochs over a short text
        trainer = SparsifyTrainer(cfg, sequences.select(rows), model)
        start, start_cpu = time.perf_counter(), cpu_seconds()
        trainer.fit()
        return time.perf_counter() - start, cpu_seconds() - start_cpu

    (wall_short, cpu_short), (wall_long, cpu_long) = fit(3), fit(3 + steps)
    tokens = steps * per_batch * run.data.ctx_len
    return Rate(tokens / (wall_long - wall_short), tokens / (cpu_long - cpu_short))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", choices=("minilm", "gpt2"), default="minilm")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=TrainerConfig.batch_size,
                        help="SAE batch (tokens per step; default: trainer.batch_size's, %(default)s)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--lm-batch", type=int, default=64, help="contexts per LM forward")
    parser.add_argument("--buffer", type=int, default=16384, help="shuffle block rows")
    parser.add_argument("--cache-tokens", type=int, default=262144)
    parser.add_argument("--documents", type=int, default=400, help="documents tokenised for the tokenise stage")
    parser.add_argument("--tokenizer", help="--lm gpt2: a tokenizer folder to pair with it (default: the bundled "
                        "MiniLM package's; on a machine without the package, a copy of its tokenizer files)")
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="skip the eai-sparsify comparison")
    parser.set_defaults(peer=importlib.util.find_spec("sparsify") is not None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here; use --device cpu", file=sys.stderr)
        sys.exit(2)
    keep_freed_host_memory()  # as the launch commands run the job
    with tempfile.TemporaryDirectory(prefix="bench_data_") as workdir:  # its runs' checkpoints take gigabytes
        measure(args, Path(workdir))


def measure(args, workdir: Path) -> None:
    """Time every stage and job, then print the table."""
    device = torch.device(args.device)
    run = base_run(args, workdir)
    model, tokenizer = load_lm(run.model, device)
    lm_source = lm_activation_source(run, model, tokenizer)
    d_model = lm_source.d_model
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak, bandwidth = gemm_flops(device, compute_dtype), copy_bandwidth(device)
    lm_flops = lm_flops_per_token(model, run.model.layer, run.data.ctx_len)
    sae_flops = flops_per_token(run.sae, d_model).total

    stages = {
        "tokenise (in this thread)": (tokenise_rate(run, tokenizer, 0, args.documents), None),
        "tokenise (2 worker processes)": (tokenise_rate(run, tokenizer, 2, args.documents), None),
        "read pretokenised contexts (data.pretokenize)": (
            tokenise_rate(run, tokenizer, pretokenize_processes(), args.documents, pretokenized=True), None),
        f"LM forward to block {run.model.layer} ({run.data.lm_batch_size} contexts/forward)":
            (lm_rate(lm_source, args.buffer, device), peak / lm_flops),
        "SAE step": (sae_step_rate(run, d_model, device), peak / sae_flops),
    }
    cache_dir = workdir / "cache"
    write_cache(RandomRows(d_model), cache_dir, args.cache_tokens, 65536, dtype=torch.bfloat16)
    cache = CachedActivationSource(cache_dir, args.buffer, device=device)
    stages["cache read (bfloat16, memory-mapped)"] = (
        timed(lambda: cache.next_batch(args.batch), args.batch, device, repeats=20), bandwidth / (d_model * 2))
    cache.close()

    no_prefetch = replace(run.data, prefetch=0)
    pretokenised = replace(run, data=replace(run.data, pretokenize=True))
    jobs = {
        "job: LM source, no prefetch": job_rate(replace(run, data=no_prefetch), build(run, model, tokenizer, 0, device),
                                                device, workdir / "job_serial"),
        "job: LM source, prefetch 4": job_rate(run, build(run, model, tokenizer, 4, device), device, workdir / "job_lm"),
        "job: LM source, prefetch 4, glibc's default malloc": default_malloc(lambda: job_rate(
            run, build(run, model, tokenizer, 4, device), device, workdir / "job_lm_default_malloc")),
        "job: LM source, pretokenised, prefetch 4": job_rate(
            pretokenised, build(pretokenised, model, tokenizer, 4, device), device, workdir / "job_pretokenised"),
        "job: cache source, prefetch 4": job_rate(
            replace(run, data=replace(run.data, source="cache", cache_dir=str(cache_dir))),
            prefetched(CachedActivationSource(cache_dir, args.buffer, device=device), 4, device), device,
            workdir / "job_cache"),
    }
    if args.peer:
        dense = replace(run, sae=replace(run.sae, kind="topk", num_experts=1))
        stages[f"SAE step, dense TopK M={dense.sae.num_latents}"] = (sae_step_rate(dense, d_model, device),
                                                                    peak / flops_per_token(dense.sae, d_model).total)
        jobs[f"job: LM source, prefetch 4, dense TopK M={dense.sae.num_latents}"] = job_rate(
            dense, build(run, model, tokenizer, 4, device), device, workdir / "job_topk")
        peer = f"peer: eai-sparsify job, dense TopK M={dense.sae.num_latents}"
        try:
            jobs[peer] = sparsify_rate(run, model, tokenizer, args.steps, workdir / "sparsify")
        except Exception as exc:  # the peer's failure is a result to show, not a reason to lose the table
            jobs[f"{peer}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"] = None
    print_table(args, run, d_model, stages, jobs, peak, bandwidth)


class RandomRows(ActivationSource):
    def __init__(self, d_model: int) -> None:
        self.d_model, self.gen = d_model, torch.Generator().manual_seed(0)

    def next_batch(self, batch_size: int) -> torch.Tensor:
        return torch.randn(batch_size, self.d_model, generator=self.gen) * 3

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def default_malloc(measure):
    """`measure()` with glibc's malloc defaults (freed memory returned, large blocks mapped afresh), as a process
    runs without the launch commands' `keep_freed_host_memory`."""
    keep_freed_host_memory(False)
    try:
        return measure()
    finally:
        keep_freed_host_memory()


def prefetched(source: ActivationSource, depth: int, device: torch.device) -> ActivationSource:
    from sae_dist.data import PrefetchingSource

    return PrefetchingSource(source, depth, device) if depth else source


def build(run: RunConfig, model, tokenizer, depth: int, device: torch.device) -> ActivationSource:
    return prefetched(lm_activation_source(run, model, tokenizer), depth, device)


def print_table(args, run, d_model, stages, jobs, peak, bandwidth) -> None:
    title = (f"{args.lm} block {run.model.layer} (d={d_model}), {run.sae.kind} M={run.sae.num_latents} "
             f"N={run.sae.num_experts} k={run.sae.k}, batch {run.trainer.batch_size}, {args.device}")
    table = Table(title=title)
    columns = ("what", "tokens/s", "floor tokens/s", "of floor", "tokens per CPU-s", "job / slowest stage")
    for column in columns:
        table.add_column(column, justify="left" if column == "what" else "right")
    for name, (value, floor) in stages.items():
        cpu = "-" if "worker" in name else f"{value.cpu:,.0f}"  # the work is in other processes
        table.add_row(name, f"{value.wall:,.0f}", f"{floor:,.0f}" if floor else "-",
                      f"{value.wall / floor:.0%}" if floor else "-", cpu, "")
    tokenise = max((v for k, (v, _) in stages.items() if k.startswith("tokenise")), key=lambda r: r.wall)
    lm = next(v for k, (v, _) in stages.items() if k.startswith("LM"))
    sae = stages["SAE step"][0]
    cache = stages["cache read (bfloat16, memory-mapped)"][0]
    serial = Rate(*(1 / (1 / a + 1 / b) for a, b in zip(lm, sae, strict=True)))
    slowest_lm_job = Rate(*(min(values) for values in zip(tokenise, lm, sae, strict=True)))
    slowest_cache_job = Rate(*(min(values) for values in zip(cache, sae, strict=True)))
    table.add_row("serial bound 1/(1/LM + 1/SAE)", f"{serial.wall:,.0f}", "", "", f"{serial.cpu:,.0f}",
                  f"{serial.wall / slowest_lm_job.wall:.0%}")
    for name, value in jobs.items():
        if "sparsify" in name:
            table.add_row(name, *((f"{value.wall:,.0f}", "", "", f"{value.cpu:,.0f}", "") if value else ("-",) * 5))
            continue
        slowest = slowest_cache_job if "cache" in name else slowest_lm_job
        if "TopK" in name:
            dense_step = next(v for k, (v, _) in stages.items() if k.startswith("SAE step, dense"))
            slowest = Rate(*(min(values) for values in zip(tokenise, lm, dense_step, strict=True)))
            serial = Rate(*(1 / (1 / a + 1 / b) for a, b in zip(lm, dense_step, strict=True)))
        ratio = f"{value.wall / slowest.wall:.0%}"
        if "LM" in name:
            ratio += f" ({value.wall / serial.wall:.0%} of serial; CPU-s: {value.cpu / serial.cpu:.0%})"
        table.add_row(name, f"{value.wall:,.0f}", "", "", f"{value.cpu:,.0f}", ratio)
    console = Console(width=160)
    console.print(table)
    console.print(f"machine: {machine_line(torch.device(args.device))}; measured GEMM {peak / 1e9:,.0f} GFLOP/s, "
                  f"copy {bandwidth / 1e9:,.1f} GB/s; cache read / SAE step = {cache.wall / sae.wall:.1f}x")
    print(json.dumps({"stages": {k: v._asdict() for k, (v, _) in stages.items()},
                      "jobs": {k: v._asdict() for k, v in jobs.items() if v}}))


if __name__ == "__main__":
    main()
