"""The parts of DeepSpeed's ZeRO optimizer that the DeepSpeed engine (`deepspeed_engine.py`) reads and writes: each
rank's flat fp32 gradient partition of a parameter, the decoder-row projection applied to it (the torch backend's
row passes of `optim.py`, a row split between two ranks summing its dot products over them), and Adam's partitioned
state gathered into, and scattered from, torch Adam's per-parameter form for checkpoints (`ZeroAdamState`).

It reads internals of DeepSpeed's ZeRO stage 1/2 optimizer (`_hp_mapping`, `_index_in_param_group`, `_dp_group`);
the `deepspeed` extra pins the version they were checked with.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sae_dist.train.optim import remove_row_components_, row_dots

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def grad_partition(param: nn.Parameter) -> tuple[Tensor, int] | None:
    """(this rank's part of the parameter's reduced gradient, flat; its offset in the flattened parameter), or None
    where this rank holds none of it. Valid between `engine.backward` and `engine.step`; edits reach the step."""
    mapping = param._hp_mapping
    if mapping is None:
        return None
    grad = mapping.get_lp_grad_fragment(param._index_in_param_group).view(-1)
    return grad, mapping.lp_fragment_address.start


@torch.no_grad()
def project_partition_(w_dec: nn.Parameter, part: tuple[Tensor, int] | None) -> None:
    """The torch backend's projection of decoder rows on a partition of w_dec's gradient (collective over its
    partition group): the rows the partition touches, padded to whole rows, with each row's dot product summed
    over the ranks that hold a part of it. The rows must be unit norm."""
    d = w_dec.shape[-1]
    rows_LD = w_dec.detach().reshape(-1, d)
    dots_L = rows_LD.new_zeros(rows_LD.shape[0])
    if part is not None:
        grad, start = part
        first, end = start // d, (start + grad.numel() - 1) // d + 1  # the rows this partition touches
        lead = start - first * d
        grad_RD = grad.new_zeros((end - first) * d)
        grad_RD[lead : lead + grad.numel()] = grad
        grad_RD = grad_RD.view(-1, d)
        dots_L[first:end] = row_dots(rows_LD[first:end], grad_RD).view(-1)
    dist.all_reduce(dots_L, group=w_dec._dp_group)
    if part is not None:
        remove_row_components_(grad_RD, dots_L[first:end].view(-1, 1, 1), rows_LD[first:end])
        grad.copy_(grad_RD.view(-1)[lead : lead + grad.numel()])


def gather_full(param: nn.Parameter, flat_partitions: list[Tensor]) -> Tensor:
    """The full fp32 tensor of a per-element state of `param` whose ZeRO partitions (one flat tensor per DeepSpeed
    parameter group) are `flat_partitions` on each rank; collective over the parameter's partition group."""
    full = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
    mapping = param._hp_mapping
    if mapping is not None:
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        full.narrow(0, lp.start, lp.numel).copy_(flat_partitions[mapping.param_group_index].narrow(0, hp.start, hp.numel))
    dist.all_reduce(full, group=param._dp_group)
    return full.view_as(param)


def scatter_full(param: nn.Parameter, value: Tensor, flat_partitions: list[Tensor]) -> None:
    """Write this rank's part of a full per-element state of `param` into its ZeRO partition (the inverse of
    `gather_full`; local)."""
    mapping = param._hp_mapping
    if mapping is not None:
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        part = value.reshape(-1).narrow(0, lp.start, lp.numel)
        flat_partitions[mapping.param_group_index].narrow(0, hp.start, hp.numel).copy_(part)


class ZeroAdamState:
    """The ZeRO optimizer's Adam state as `engine.Engine.optimizer_state` gives it to checkpoints: built
    collectively, it holds every parameter's full Adam state (gathered from the partitions) in torch Adam's
    per-parameter form; `load_state_dict` scatters such a state back into the partitions.

    Adam's state is read from torch's Adam on DeepSpeed's flat fp32 partitions directly: DeepSpeed 0.19.8's
    `safe_get_full_optimizer_state` links the state of the first parameter group only (it links after the first
    group's first step), so it fails for expert parameters."""

    def __init__(self, model: nn.Module, zero_optimizer):
        self.model, self.zero = model, zero_optimizer
        self.param_groups = [{"params": list(model.parameters())}]
        self.state: defaultdict[nn.Parameter, dict[str, Tensor]] = defaultdict(dict)
        partition_states = self._partition_states()
        if partition_states[0]:  # torch's Adam creates its state at the first step
            for param in self.param_groups[0]["params"]:
                moments = {key: gather_full(param, [s[key] for s in partition_states]) for key in ADAM_MOMENTS}
                self.state[param] = {**moments, "step": partition_states[0]["step"].clone()}

    def _partition_states(self) -> list[dict[str, Tensor]]:
        """torch Adam's state of each of DeepSpeed's flat fp32 partitions (one per parameter group)."""
        return [self.zero.optimizer.state[flat] for flat in self.zero.single_partition_of_fp32_groups]

    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters as one torch Adam group over the model's parameters (all DeepSpeed groups share them)."""
        shared = {k: v for k, v in self.zero.optimizer.param_groups[0].items() if k not in ("params", "name", "moe")}
        return {"state": {}, "param_groups": [{**shared, "params": list(range(len(self.param_groups[0]["params"])))}]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Write torch Adam's state (keyed by parameter index, as `state_dict` numbers them) into the partitions."""
        state = state_dict["state"]
        for flat in self.zero.single_partition_of_fp32_groups:
            adam = self.zero.optimizer.state[flat]
            adam.update({key: adam.get(key, torch.zeros_like(flat)) for key in ADAM_MOMENTS})
            adam["step"] = state[0]["step"].clone()
        partition_states = self._partition_states()
        for index, param in enumerate(self.param_groups[0]["params"]):
            for key in ADAM_MOMENTS:
                scatter_full(param, state[index][key].to(param.device), [s[key] for s in partition_states])
        saved = {k: v for k, v in state_dict["param_groups"][0].items() if k != "params"}
        for group in self.zero.optimizer.param_groups:
            group.update(saved)
