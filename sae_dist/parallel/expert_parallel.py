"""The expert-parallel context: the collectives of one training step on W ranks (docs/math.md section 8).

Each rank's loss is a mean over its own B / W tokens, so the global loss is the mean of the rank losses, and:
- a replicated parameter (b_pre, router) gets the mean of its W rank gradients;
- an expert parameter already holds, after the all-to-all backward, the sum of the gradients from every token
  of its expert-parallel group; summing over its W / P replicas and dividing by W gives the global gradient.
Both equal the single-device gradient of the global batch. A dense SAE (TopK, ReLU) runs with P = 1: every
parameter is replicated and this is plain data parallelism.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from sae_dist.config import RunConfig
from sae_dist.parallel.all_to_all import AllToAllDispatcher
from sae_dist.parallel.comm import CommStats, all_reduce_flat_, nbytes
from sae_dist.models.base import is_expert_sharded
from sae_dist.parallel.context import ParallelContext, squared_norm
from sae_dist.parallel.mesh import ExpertMesh, build_mesh, init_process_group, validate_layout
from sae_dist.parallel.overlap import OverlappedAllToAllDispatcher


def split_gradients(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(replicated, expert) gradients in a fixed order; a missing gradient becomes zeros so every rank reduces
    the same tensors."""
    replicated, experts = [], []
    for name, param in model.named_parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        (experts if is_expert_sharded(model, name) else replicated).append(param.grad)
    return replicated, experts


class ExpertParallelContext(ParallelContext):
    """W ranks in a ("dp", "ep") mesh; the experts of a Switch SAE sharded over each "ep" group."""

    distributed = True

    def __init__(self, mesh: ExpertMesh, capacity_factor: float | None = None, a2a_chunks: int = 1):
        self.mesh = mesh
        self.rank, self.world_size = mesh.rank, mesh.world_size
        self.expert_replicas = mesh.dp_size
        self.capacity_factor = capacity_factor
        self.a2a_chunks = a2a_chunks
        self.stats = CommStats()

    @classmethod
    def from_config(cls, run: RunConfig, device_type: str) -> ExpertParallelContext:
        """Validate the layout, join torchrun's process group and build the mesh, every group timing out after
        parallel.timeout_s."""
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        ep_size = validate_layout(run, world)
        timeout = timedelta(seconds=run.parallel.timeout_s)
        init_process_group(device_type, timeout)
        mesh = build_mesh(device_type, ep_size, timeout)
        return cls(mesh, run.parallel.capacity_factor, run.parallel.a2a_chunks)

    def dispatcher(self, num_experts: int) -> AllToAllDispatcher:
        if self.a2a_chunks > 1:
            group, chunks = self.mesh.ep_group, self.a2a_chunks
            return OverlappedAllToAllDispatcher(num_experts, group, chunks, self.capacity_factor, self.stats)
        return AllToAllDispatcher(num_experts, self.mesh.ep_group, self.capacity_factor, self.stats)

    def local_batch_size(self, global_batch: int) -> int:
        return global_batch // self.world_size

    def gather_rows(self, x_TD: Tensor) -> Tensor:
        parts = [torch.empty_like(x_TD) for _ in range(self.world_size)]
        dist.all_gather(parts, x_TD.contiguous())
        self.stats.add("all_gather", nbytes(x_TD))
        return torch.cat(parts)

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        total = t.detach().clone()
        dist.all_reduce(total)
        self.stats.add("all_reduce", nbytes(total))
        return total

    def merge_fired(self, fired_L: Tensor) -> Tensor:
        if self.mesh.dp_size == 1:
            return fired_L
        hits_L = fired_L.to(torch.int32)
        dist.all_reduce(hits_L, group=self.mesh.dp_group)
        self.stats.add("all_reduce", nbytes(hits_L))
        return hits_L > 0

    def sum_over_expert_replicas(self, t: Tensor) -> Tensor:
        total = t.detach().clone()
        if self.mesh.dp_size > 1:
            dist.all_reduce(total, group=self.mesh.dp_group)
            self.stats.add("all_reduce", nbytes(total))
        return total

    def sync_gradients(self, model: nn.Module) -> None:
        replicated, experts = split_gradients(model)
        scale = 1.0 / self.world_size
        all_reduce_flat_(replicated, dist.group.WORLD, self.stats, scale)
        if self.mesh.dp_size > 1:
            all_reduce_flat_(experts, self.mesh.dp_group, self.stats, scale)
        elif experts:
            torch._foreach_mul_(experts, scale)

    def grad_norm(self, model: nn.Module) -> Tensor:
        """The norm of the global gradient: replicated parameters once, each expert once (summed over "ep")."""
        replicated, experts = split_gradients(model)
        device = next(model.parameters()).device
        expert_sq = squared_norm(experts, device)
        if self.mesh.ep_size > 1:
            dist.all_reduce(expert_sq, group=self.mesh.ep_group)
        return (squared_norm(replicated, device) + expert_sq).sqrt()

    def barrier(self) -> None:
        dist.barrier()

    def sharded_view(self, local: Tensor) -> Tensor:
        return DTensor.from_local(local, self.mesh.device_mesh, [Replicate(), Shard(0)], run_check=False)

