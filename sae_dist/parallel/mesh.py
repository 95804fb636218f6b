"""The process layout: W ranks as a DeviceMesh with dimensions ("dp", "ep"), built once from torchrun's env.

Rank r sits at (dp, ep) = (r // P, r % P). The P ranks of one "ep" group are consecutive and together hold all N
experts (N / P each), so with P <= GPUs per node the all-to-all stays on a node's fast links. Ranks with the same
ep index hold the same experts and form a "dp" group: the W / P expert-data-parallel replicas.

Every group (the world and the mesh's "dp" and "ep" groups) gets the same timeout, `parallel.timeout_s`: a rank
that dies or stalls makes the others fail within it instead of hanging (see `failures`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from sae_dist.config import ConfigError, RunConfig
from sae_dist.launcher_env import restart_count
from sae_dist.validation import architecture_facts


def launched_by_torchrun() -> bool:
    """True under torchrun (or srun + torchrun) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def expert_parallel_size(run: RunConfig, world_size: int) -> int:
    """P: parallel.ep_size, by default the whole world for a routed SAE and 1 (pure data parallel) otherwise."""
    if run.parallel.ep_size is not None:
        return run.parallel.ep_size
    return world_size if architecture_facts(run.sae.kind).routed else 1


def validate_layout(run: RunConfig, world_size: int) -> int:
    """Check that the experts and the batch split evenly over the ranks; return P. One-line ConfigError otherwise."""
    cf = run.parallel.capacity_factor
    if world_size == 1 and cf is not None:
        raise ConfigError(
            f"parallel.capacity_factor={cf} applies to expert-parallel dispatch (torchrun with 2 or more ranks); "
            "in one process every token reaches its expert: use null"
        )
    ep_size = expert_parallel_size(run, world_size)
    default = "" if run.parallel.ep_size is not None else " (the default; set parallel.ep_size)"
    if world_size % ep_size:
        raise ConfigError(f"parallel.ep_size={ep_size} does not divide the world size {world_size}{default}")
    if run.sae.num_experts % ep_size:
        raise ConfigError(
            f"sae.num_experts={run.sae.num_experts} is not divisible by parallel.ep_size={ep_size}{default}"
        )
    if run.trainer.batch_size % world_size:
        batch = run.trainer.batch_size
        raise ConfigError(f"trainer.batch_size={batch} is not divisible by the world size {world_size}")
    return ep_size


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def _attempt_store(timeout: timedelta) -> dist.Store | None:
    """Under torchrun, a store of its own for each attempt, or None elsewhere (env:// as usual).

    Workers share the torchrun agent's store, which outlives a restart with the previous attempt's keys: the
    groups of a restarted worker then look up peers of the dead attempt and fail to connect. Prefixing every key
    with the attempt number keeps the attempts apart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]), is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"sae_dist/attempt_{restart_count()}", agent_store)


def init_process_group(device_type: str, timeout: timedelta | None = None) -> None:
    """Join the job torchrun started (RANK, WORLD_SIZE, MASTER_ADDR/PORT in env): NCCL on CUDA, gloo on CPU.

    A process started without torchrun (no MASTER_ADDR) forms a group of one, for code that needs a process group
    even on one device (the DeepSpeed engine)."""
    if dist.is_initialized():
        return
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs = {} if timeout is None else {"timeout": timeout}
    store = _attempt_store(timeout or dist.default_pg_timeout)
    if store is not None:
        kwargs.update(store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    elif "MASTER_ADDR" not in os.environ:
        kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group(backend_for(device_type), **kwargs)


@dataclass(frozen=True)
class ExpertMesh:
    """The ("dp", "ep") mesh and the two process groups cut from it."""

    device_mesh: DeviceMesh

    @property
    def ep_group(self) -> ProcessGroup:
        return self.device_mesh.get_group("ep")

    @property
    def dp_group(self) -> ProcessGroup:
        return self.device_mesh.get_group("dp")

    @property
    def ep_size(self) -> int:
        return self.device_mesh.size(1)

    @property
    def dp_size(self) -> int:
        return self.device_mesh.size(0)

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()


def _group_options(device_type: str, timeout: timedelta) -> object:
    """Backend options that carry `timeout` (a DeviceMesh's groups otherwise get torch's default, 10-30 min)."""
    options = dist.ProcessGroupNCCL.Options() if device_type == "cuda" else dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    return options


def build_mesh(device_type: str, ep_size: int, timeout: timedelta | None = None) -> ExpertMesh:
    """The mesh of the initialised world with expert-parallel size P = `ep_size` (validated by the caller); its
    groups time out after `timeout` (default: torch's)."""
    world = dist.get_world_size()
    override = None
    if timeout is not None:
        backend = backend_for(device_type)
        override = {dim: (backend, _group_options(device_type, timeout)) for dim in ("dp", "ep")}
    mesh = init_device_mesh(
        device_type, (world // ep_size, ep_size), mesh_dim_names=("dp", "ep"), backend_override=override
    )
    return ExpertMesh(mesh)


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (e.g. a run folder whose name holds a timestamp)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
