"""Routing: which experts each token goes to, and how routed tokens reach them and come back.

The router (docs/math.md section 2) sends each token to its top-e experts (e = 1: the paper's top-1) by a float32
softmax; the Switch Transformer load-balancing loss (docs/math.md section 4) counts every (token, expert) assignment.

The expert code sees only rows grouped by local expert (`ExpertGroups`); whether those rows came from a local sort
(`LocalDispatcher`) or from an all-to-all between ranks (`sae_dist.parallel`) is hidden behind the dispatch
interface (`TokenDispatcher`). Dispatch is stateless: `dispatch` returns the rows and a plan, and `combine` takes that
plan back (`dispatch_like` sends more per-token data along it), so several dispatches can be in flight at once (the
overlapped all-to-all runs one per chunk). `run` does dispatch, the experts and combine in one call; a dispatcher
that overlaps communication with compute overrides it.

Suffix T below counts the dispatcher's input rows: one per token under top-1 routing, one per (token, chosen
expert) under top-e routing (what the SAE calls S = T * e, token-major); R counts the dispatched rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Routing(NamedTuple):
    probs_TN: Tensor
    """Router softmax, float32."""
    expert_TE: Tensor
    """The e highest-probability experts per token, best first (long, no gradient); e = 1: the argmax."""
    gate_TE: Tensor
    """Their probabilities p, float32; the only path by which the reconstruction loss trains the router."""

    @property
    def expert_T(self) -> Tensor:
        """Each token's most probable expert."""
        return self.expert_TE[:, 0]

    @property
    def gate_T(self) -> Tensor:
        """Its probability."""
        return self.gate_TE[:, 0]


class Router(nn.Module):
    """p = softmax(W_router (x - b_router)) in float32, also under autocast; each token's `experts_per_token`
    largest p (e = 1: argmax p)."""

    def __init__(
        self, d_model: int, num_experts: int, generator: torch.Generator | None = None, experts_per_token: int = 1
    ):
        super().__init__()
        self.experts_per_token = experts_per_token
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.b_router = nn.Parameter(torch.zeros(d_model))
        bound = d_model**-0.5  # nn.Linear's default (kaiming_uniform with a=sqrt(5)) bound
        with torch.no_grad():
            self.weight.uniform_(-bound, bound, generator=generator)

    def forward(self, x_TD: Tensor) -> Routing:
        # Autocast would run this GEMM in bf16/fp16 and change the chosen expert of near-tied tokens.
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TN = F.linear(x_TD.float() - self.b_router.float(), self.weight.float())
            probs_TN = logits_TN.softmax(dim=-1)
        if self.experts_per_token == 1:
            expert_TE = probs_TN.argmax(dim=-1, keepdim=True)
        else:
            expert_TE = probs_TN.topk(self.experts_per_token, dim=-1).indices
        return Routing(probs_TN, expert_TE, probs_TN.gather(1, expert_TE))


def expert_counts(expert_T: Tensor, num_experts: int) -> Tensor:
    """Tokens routed to each expert, [N] long; unlike `bincount` it never reads the ids back to the host."""
    counts_N = torch.zeros(num_experts, dtype=torch.long, device=expert_T.device)
    return counts_N.index_add_(0, expert_T, torch.ones_like(expert_T))


def load_balancing_loss(
    routing: Routing, num_experts: int, all_reduce_counts: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """L_lb = N * sum_i f_i P_i; f from hard counts (no gradient), P = mean router probability.

    Under top-e routing f_i is expert i's share of all T * e assignments (sums to 1, so the minimum stays 1 at a
    uniform router whatever e; docs/math.md section 2).

    `all_reduce_counts` sums the [N] counts over ranks for global-batch balancing (expert parallelism); P stays
    local, so averaging this loss's gradient over ranks equals the single-device gradient over the global batch.
    """
    counts_N = expert_counts(routing.expert_TE.flatten(), num_experts).to(torch.float32)
    if all_reduce_counts is not None:
        counts_N = all_reduce_counts(counts_N)
    fraction_N = counts_N / counts_N.sum().clamp_min(1)
    mean_prob_N = routing.probs_TN.mean(dim=0)
    return num_experts * (fraction_N * mean_prob_N).sum()


class ExpertGroups(NamedTuple):
    """How dispatched rows split into local experts: expert e owns rows offsets_L[e-1] .. offsets_L[e] - 1."""

    counts_L: Tensor
    """Rows per local expert, long, on the rows' device."""
    offsets_L: Tensor
    """Inclusive cumulative counts, int32 (the `offs` of `torch.nn.functional.grouped_mm`)."""
    expert_R: Tensor
    """Local expert of each row, long."""
    counts: list[int] | None
    """The counts on the host when they are known without a device-to-host copy (CPU, or after an all-to-all)."""

    @classmethod
    def from_counts(cls, counts_L: Tensor, rows: int, counts: list[int] | None = None) -> ExpertGroups:
        """Groups from per-expert counts; `rows` (their sum, known on the host) avoids a synchronisation."""
        experts = torch.arange(counts_L.numel(), device=counts_L.device)
        expert_R = torch.repeat_interleave(experts, counts_L, output_size=rows)
        return cls(counts_L, torch.cumsum(counts_L, 0).to(torch.int32), expert_R, counts)

    def host_counts(self) -> list[int]:
        """The counts as Python ints (a device-to-host copy unless already known)."""
        return self.counts if self.counts is not None else self.counts_L.tolist()


class DispatchPlan(NamedTuple):
    """What `combine` needs to reverse one `dispatch`; subclasses of the dispatcher define its contents."""

    tokens: int
    groups: ExpertGroups | None
    """How the dispatched rows split into local experts; None when they went in several chunks, each grouped."""
    kept_T: Tensor | None
    """Input rows that reached an expert; None when the dispatcher is dropless."""
    state: tuple
    """Dispatcher-specific permutations and split sizes."""


class ExpertRun(NamedTuple):
    """The result of `TokenDispatcher.run`."""

    combined_T: Tensor
    """The experts' first output, back in the input rows' order (dropped rows get zero rows)."""
    per_row: tuple
    """The experts' other outputs, one row per dispatched row, in the order `plan` describes."""
    plan: DispatchPlan


ExpertFn = Callable[[Tensor, ExpertGroups], tuple[Tensor, tuple]]
"""expert_fn(rows_RD, groups) -> (rows to combine [R, ...], other per-row outputs)."""


class TokenDispatcher(ABC):
    """dispatch() groups tokens by expert; combine() returns per-row results to token order.

    Experts `first_local_expert .. first_local_expert + num_local_experts - 1` (global ids) live here.
    """

    num_local_experts: int
    first_local_expert: int = 0

    @abstractmethod
    def dispatch(self, x_TD: Tensor, expert_T: Tensor, scores_T: Tensor | None = None) -> tuple[Tensor, DispatchPlan]:
        """Return rows_RD grouped by local expert and the plan that combine() reverses.

        `scores_T` (the router probability of each token's expert) ranks tokens when a capacity limit must drop
        some; dispatchers without a limit ignore it.
        """

    @abstractmethod
    def combine(self, y_R: Tensor, plan: DispatchPlan) -> Tensor:
        """Inverse of the dispatch that made `plan`, for a tensor with one row per dispatched row: [R, ...] -> [T, ...]."""

    @abstractmethod
    def dispatch_like(self, y_T: Tensor, plan: DispatchPlan) -> Tensor:
        """The forward direction of `combine`: a tensor with one row per token [T, ...] sent where `plan` sent the
        tokens, [R, ...] in the dispatched rows' order (tokens the plan dropped are not sent)."""

    def run(self, x_TD: Tensor, expert_T: Tensor, scores_T: Tensor | None, expert_fn: ExpertFn) -> ExpertRun:
        """Dispatch, run the local experts on their rows, combine their first output."""
        rows_RD, plan = self.dispatch(x_TD, expert_T, scores_T)
        y_R, per_row = expert_fn(rows_RD, plan.groups)
        return ExpertRun(self.combine(y_R, plan), per_row, plan)


def inverse_permutation(order: Tensor) -> Tensor:
    """The inverse of a permutation: x[order][inverse] == x."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


class _PermuteRows(torch.autograd.Function):
    """rows[order] for a permutation `order`, whose backward is the gather grad[inverse]: indexing's own backward
    is a scatter-add (autograd cannot know the indices are a permutation), 3x the gather's time on a CPU. Both
    gathers are `index_select`, half the time of indexing's on a CPU."""

    @staticmethod
    def forward(ctx, rows, order, inverse):
        ctx.save_for_backward(inverse)
        return rows.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(rows: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
    """rows[order], differentiable, where `inverse` is the inverse permutation of `order`."""
    return _PermuteRows.apply(rows, order, inverse)


def sort_by_expert(expert_T: Tensor) -> tuple[Tensor, Tensor]:
    """Stable sort of tokens by expert id: (order_T, inverse_T) with x[order][inverse] == x."""
    order_T = torch.argsort(expert_T, stable=True)
    return order_T, inverse_permutation(order_T)


class LocalDispatcher(TokenDispatcher):
    """All experts on this device: a stable sort by expert and its inverse; dropless, so `scores_T` is unused.

    Nothing is read back to the host: on a GPU the step never waits for the routing.
    """

    def __init__(self, num_experts: int):
        self.num_local_experts = num_experts

    def dispatch(self, x_TD: Tensor, expert_T: Tensor, scores_T: Tensor | None = None) -> tuple[Tensor, DispatchPlan]:
        order_T, inverse_T = sort_by_expert(expert_T)
        counts_L = expert_counts(expert_T, self.num_local_experts)
        host_counts = counts_L.tolist() if counts_L.device.type == "cpu" else None
        groups = ExpertGroups.from_counts(counts_L, x_TD.shape[0], host_counts)
        return permute_rows(x_TD, order_T, inverse_T), DispatchPlan(x_TD.shape[0], groups, None, (order_T, inverse_T))

    def combine(self, y_R: Tensor, plan: DispatchPlan) -> Tensor:
        order_T, inverse_T = plan.state
        return permute_rows(y_R, inverse_T, order_T)

    def dispatch_like(self, y_T: Tensor, plan: DispatchPlan) -> Tensor:
        order_T, inverse_T = plan.state
        return permute_rows(y_T, order_T, inverse_T)
