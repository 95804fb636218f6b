"""The DeepSpeed engine (`trainer.engine=deepspeed`): the same models, data and step, with DeepSpeed's ZeRO optimizer
(stage 1 or 2) holding Adam's state and the fp32 master weights partitioned over the ranks and reducing gradients.

It implements `engine.Engine`; the step (`step.TrainStep`) calls it in the torch engine's order:
1. Forward and loss: `TrainStep.forward_loss`, unchanged, with its autocast (`trainer.dtype=bfloat16` on GPU: bf16
   matmuls, fp32 weights, gradients and reductions, as in the torch engine; DeepSpeed's own bf16 mode would keep the
   router, b_pre and the decoder rows in bf16, which docs/math.md section 2 keeps in fp32). The sparse kernels hand
   their weight gradients to autograd (`weight_grads_in_place = False`), whose accumulation DeepSpeed hooks.
2. Backward: DeepSpeed's `engine.backward`, whose ZeRO hooks reduce the gradients into partitions. Expert
   parameters are DeepSpeed MoE parameters of group "ep_size_P": DeepSpeed divides every gradient bucket by the
   data-parallel world size W and sums expert buckets over their W/P expert-data-parallel replicas only, replicated
   ones over all W ranks: docs/math.md section 8's scaling (replicated averaged over W, experts summed over replicas and
   divided by W).
3. The true global norm: from each rank's gradient partitions (every element of the global gradient lives in
   exactly one partition, so the partitions' squared norms summed over all ranks give the global one).
4. Project: each decoder row's gradient loses its component along the row (the optimizer's torch backend,
   `deepspeed_zero.project_partition_`, on the rows a partition touches); a row may straddle two
   partitions, so the per-row dot products are summed over the parameter's partition group in between.
5. Adam: DeepSpeed's `engine.step()`, torch's fused Adam on the fp32 partitions, which clips by the global norm and
   skips a non-finite step inside its own pass as in the torch engine (`grad_scale`, `found_inf`); DeepSpeed's
   clipping and its own norm are off. The masters first take the module's parameters (a local copy): parameters are
   fp32 throughout, so this carries in only what was written to the module since the last step (the renormalised
   rows of step 6, the geometric-median biases, a restored checkpoint). Then the parameters are all-gathered and the
   lr schedule steps.
6. Renormalise decoder rows: the torch backend's `normalize_rows_` on the module's parameters.

Checkpoints use the project's format (`checkpoint.py`): Adam's moments are gathered from the partitions per
parameter on save and scattered back on load, so a run resumes on either engine, on any valid layout, and
`load_sae` reads it. The only DeepSpeed internals used are those its public `safe_*` tensor-fragment functions use
(`_hp_mapping`, `_index_in_param_group`, `_dp_group`), the flat fp32 partitions of the ZeRO optimizer and the
expert-group constructor its MoE layer calls; the `deepspeed` extra pins the version they were checked with.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from sae_dist.config import ConfigError, RunConfig
from sae_dist.models.base import is_expert_sharded
from sae_dist.parallel.context import ParallelContext
from sae_dist.train.deepspeed_zero import ZeroAdamState, grad_partition, project_partition_
from sae_dist.train.optim import build_optimizer, build_scheduler, clip_and_skip, normalize_rows_


def import_deepspeed(device_type: str):
    """The deepspeed module with its accelerator matching the run's device; one-line error if it is missing."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device_type == "cuda" else "cpu")
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it; torchrun sets it, a lone process has rank 0
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("trainer.engine=deepspeed needs DeepSpeed: pip install -e '.[deepspeed]'") from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert groups of expert-parallel size P."""
    return f"ep_size_{ep_size}"


def build_expert_parallel_module(sae: nn.Module, num_experts: int, ep_size: int) -> nn.Module:
    """`sae` inside a `deepspeed.moe.layer.MoE`: the engine creates its expert groups and reduces expert gradients
    over expert-data-parallel replicas only when the model holds such a module."""
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    class ExpertParallelSAE(MoE):
        def __init__(self):
            nn.Module.__init__(self)  # not MoE's: the SAE brings its own router, dispatcher and experts
            self.sae = sae
            self.num_experts, self.ep_size = num_experts, ep_size
            self.expert_group_name = expert_group_name(ep_size)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """DeepSpeed's default layout, experts on consecutive ranks, is the project's ("dp", "ep") mesh."""
            if self.expert_group_name not in groups._get_expert_parallel_group_dict():
                groups._create_expert_and_data_parallel(self.ep_size)

        def forward(self, *args, **kwargs):
            return self.sae(*args, **kwargs)

    for name, param in sae.named_parameters():
        if is_expert_sharded(sae, name):
            param.allreduce, param.group_name = False, expert_group_name(ep_size)  # DeepSpeed's MoE marks
    return ExpertParallelSAE()


def deepspeed_config(zero_stage: int, local_batch: int) -> dict[str, Any]:
    """The engine's configuration: ZeRO stage 1 or 2, fp32 parameters, no DeepSpeed clipping or norm (step 5)."""
    return {
        "train_micro_batch_size_per_gpu": local_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": zero_stage, "contiguous_gradients": True, "compute_grad_norm": False},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


class SharedScheduleLR(LambdaLR):
    """A LambdaLR over parameter groups that share one schedule (DeepSpeed's replicated and expert groups), whose
    state is saved as the torch engine's single group, so a checkpoint's schedule loads on either engine."""

    PER_GROUP = ("base_lrs", "_last_lr", "lr_lambdas")

    def state_dict(self) -> dict[str, Any]:
        return {key: value[:1] if key in self.PER_GROUP else value for key, value in super().state_dict().items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = len(self.optimizer.param_groups)
        super().load_state_dict(
            {key: value[:1] * groups if key in self.PER_GROUP else value for key, value in state_dict.items()}
        )


# --- the engine ----------------------------------------------------------------------------------------------
class DeepSpeedEngine:
    """`engine.Engine` over DeepSpeed's ZeRO optimizer (steps 2-6 in the module doc): Adam over DeepSpeed's
    parameter groups (replicated, and experts per expert group) inside a DeepSpeed engine. Needs an
    expert-parallel context (a process group, also of one rank)."""

    weight_grads_in_place = False
    graph_capturable = False

    def __init__(self, model: nn.Module, run: RunConfig, ctx: ParallelContext, device: torch.device):
        deepspeed = import_deepspeed(device.type)
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        ep_size = getattr(getattr(ctx, "mesh", None), "ep_size", None)
        if ep_size is None:
            raise ConfigError("trainer.engine=deepspeed runs in a process group: use launch/train.py or torchrun")
        self.model, self.device, self.max_norm = model, device, run.trainer.grad_clip
        has_experts = any(is_expert_sharded(model, name) for name, _ in model.named_parameters())
        module = build_expert_parallel_module(model, run.sae.num_experts, ep_size) if has_experts else None
        groups = split_params_into_different_moe_groups_for_optimizer(
            {"params": list(model.parameters()), "name": "replicated"}
        )
        adam = build_optimizer(model, run, groups)
        self.scheduler = build_scheduler(adam, run, SharedScheduleLR)
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        config = deepspeed_config(run.trainer.zero_stage, ctx.local_batch_size(run.trainer.batch_size))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module or model, optimizer=adam, lr_scheduler=self.scheduler, config=config
        )
        if has_experts:
            check_expert_groups(ctx.mesh, ep_size)

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss)

    @torch.no_grad()
    def reduce_gradients(self) -> Tensor:
        """The global norm of the reduced gradient partitions (steps 2-3), then the decoder rows' projection on them
        (step 4: the partitions can be edited only between the backward and the update)."""
        parts = {param: grad_partition(param) for param in self.model.parameters()}
        grads = [part[0] for part in parts.values() if part is not None]
        squares = [torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)).square() for g in grads]
        total_sq = torch.stack(squares).sum() if squares else torch.zeros((), device=self.device)
        dist.all_reduce(total_sq)
        for w_dec in self.model.decoder_weights():
            project_partition_(w_dec, parts[w_dec])
        return total_sq.sqrt()

    def update(self, grad_norm: Tensor, finite: Tensor) -> float:
        """Steps 5-6: masters refreshed from the module, DeepSpeed's step with the clip and skip of the torch
        backend, then the decoder rows renormalised."""
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.refresh_fp32_params()
        clip_and_skip(self.optimizer.optimizer, grad_norm, self.max_norm, finite)
        self.engine.step()
        for w_dec in self.model.decoder_weights():
            normalize_rows_(w_dec.detach(), finite)
        return lr

    def optimizer_state(self) -> ZeroAdamState:
        return ZeroAdamState(self.model, self.optimizer)


def check_expert_groups(mesh, ep_size: int) -> None:
    """DeepSpeed's expert and expert-data-parallel groups hold the same ranks as the mesh's "ep" and "dp" groups."""
    from deepspeed.utils import groups

    name = expert_group_name(ep_size)
    pairs = (
        (groups._get_expert_parallel_group(name), mesh.ep_group),
        (groups._get_expert_data_parallel_group(name), mesh.dp_group),
    )
    for deepspeed_group, mesh_group in pairs:
        deepspeed_ranks, mesh_ranks = dist.get_process_group_ranks(deepspeed_group), dist.get_process_group_ranks(mesh_group)
        if deepspeed_ranks != mesh_ranks:
            raise RuntimeError(f"DeepSpeed's expert group holds ranks {deepspeed_ranks}, the mesh's {mesh_ranks}")
