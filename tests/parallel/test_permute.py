"""The dispatch's index arithmetic on hand-computed layouts (no processes), and the layout validation."""

import pytest
import torch

from sae_dist.config import ConfigError, RunConfig
from sae_dist.models.routing import LocalDispatcher, inverse_permutation
from sae_dist.parallel.mesh import expert_parallel_size, validate_layout
from sae_dist.parallel.permute import capacity, group_by_local_expert, send_order


def test_send_order_groups_by_expert_keeping_token_order():
    order, sent, kept = send_order(torch.tensor([2, 0, 2, 1, 0]), num_experts=4)
    assert order.tolist() == [1, 4, 3, 0, 2]
    assert sent.tolist() == [2, 1, 2, 0]
    assert kept is None


def test_send_order_with_no_tokens():
    order, sent, kept = send_order(torch.zeros(0, dtype=torch.long), num_experts=3, scores_T=torch.zeros(0), limit=1)
    assert order.numel() == 0 and kept.numel() == 0
    assert sent.tolist() == [0, 0, 0]


def test_capacity_keeps_highest_scores_ties_by_position():
    expert_T = torch.tensor([0, 0, 0, 1, 0, 2, 2])
    scores_T = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.9, 0.3, 0.3])
    order, sent, kept = send_order(expert_T, num_experts=4, scores_T=scores_T, limit=2)
    # Expert 0 keeps its two 0.9s; expert 2's tie is within the limit; expert 1 and 3 are under it.
    assert kept.tolist() == [False, True, False, True, True, True, True]
    assert order.tolist() == [1, 4, 3, 5, 6]
    assert sent.tolist() == [2, 1, 2, 0]
    _, _, kept_one = send_order(expert_T, num_experts=4, scores_T=scores_T, limit=1)
    assert kept_one.tolist() == [False, True, False, True, False, True, False]  # ties: the earlier position
    _, sent_none, kept_none = send_order(expert_T, num_experts=4, scores_T=scores_T, limit=0)
    assert not kept_none.any() and sent_none.sum() == 0


def test_capacity_needs_scores():
    with pytest.raises(ValueError, match="router scores"):
        send_order(torch.tensor([0, 1]), num_experts=2, limit=1)


def test_capacity_formula():
    assert capacity(1.0, 8, 4) == 2
    assert capacity(1.25, 10, 4) == 4  # ceil(3.125)
    assert capacity(2.0, 0, 8) == 0


def test_group_by_local_expert_with_empty_sources_and_experts():
    # 3 source ranks x 3 local experts; source 1 sends nothing, expert 1 gets rows from source 2 only.
    counts_PL = torch.tensor([[2, 0, 1], [0, 0, 0], [1, 3, 0]])
    # Received: s0/e0 rows 0-1, s0/e2 row 2, s2/e0 row 3, s2/e1 rows 4-6.
    index = group_by_local_expert(counts_PL)
    assert index.tolist() == [0, 1, 3, 4, 5, 6, 2]
    received = torch.arange(7)
    assert torch.equal(received[index][inverse_permutation(index)], received)


def test_group_by_local_expert_with_nothing_received():
    assert group_by_local_expert(torch.zeros(4, 2, dtype=torch.long)).numel() == 0


def test_local_dispatcher_ignores_scores():
    dispatcher = LocalDispatcher(3)
    x_TD = torch.arange(8.0).view(4, 2)
    rows, plan = dispatcher.dispatch(x_TD, torch.tensor([2, 0, 2, 0]), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert plan.groups.counts == [2, 0, 2] and plan.kept_T is None
    assert plan.groups.expert_R.tolist() == [0, 0, 2, 2] and plan.groups.offsets_L.tolist() == [2, 2, 4]
    assert torch.equal(dispatcher.combine(rows, plan), x_TD)


def layout_run(kind="switch", experts=8, ep_size=None, batch=1024) -> RunConfig:
    run = RunConfig()
    run.sae.kind, run.sae.num_experts, run.sae.num_latents = kind, experts, 64 * experts
    run.parallel.ep_size, run.trainer.batch_size = ep_size, batch
    return run


def test_layout_defaults_and_validation():
    assert expert_parallel_size(layout_run(), 4) == 4
    assert expert_parallel_size(layout_run("topk", experts=1), 4) == 1
    assert validate_layout(layout_run(ep_size=2), 4) == 2
    with pytest.raises(ConfigError, match=r"^parallel.ep_size=3 does not divide the world size 4$"):
        validate_layout(layout_run(ep_size=3), 4)
    with pytest.raises(ConfigError, match=r"^sae.num_experts=6 is not divisible by parallel.ep_size=4 \(the default"):
        validate_layout(layout_run(experts=6), 4)
    with pytest.raises(ConfigError, match=r"^trainer.batch_size=1000 is not divisible by the world size 16$"):
        validate_layout(layout_run(ep_size=8, batch=1000), 16)
