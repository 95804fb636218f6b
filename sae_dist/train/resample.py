"""Dead-latent resampling (Anthropic, "Towards Monosemanticity", 2023): `sae.resample_every`.

Every `resample_every` steps while the lr is at its full value (before `trainer.lr_decay_frac`'s decay), after the
optimizer step, each dead latent (as `sae.dead_count` counts) gets new weights: an input x routed to its expert in
this step's global batch (under top-e routing, a token counts for its first-choice expert only), drawn with
probability proportional to ||x - x_hat||^2, gives the decoder row the unit direction of x - b_pre and the encoder
row that direction times 0.2 times the mean norm of the expert's live encoder rows (Anthropic's choice; the mean of
all its rows when none is live); a transcoder draws by ||y - y_hat||^2, its encoder row along x - b_in and its
decoder row along y - b_out (docs/math.md section 9); b_enc = 0; the Adam moments of those rows and the latents' dead
counters are reset.

The draws of expert i come from a generator seeded by (seed, step, i) over the global batch, which every rank
gathers: every rank holding expert i, whatever the layout, draws the same rows, and a resumed run draws what an
unbroken one did. An expert that got no token (or no error) in the batch keeps its dead latents until the next time.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from sae_dist.models.base import SAEOutput
from sae_dist.models.expert_sae import ExpertSAE
from sae_dist.parallel.context import ParallelContext

ENCODER_NORM_SCALE = 0.2
"""A new encoder row's norm, as a fraction of the mean norm of its expert's live encoder rows (Anthropic)."""


def resample_generator(seed: int, step: int, expert: int) -> torch.Generator:
    """A CPU generator of (run seed, step, global expert id) only: independent of the rank and the layout."""
    digest = hashlib.sha256(f"resample/{seed}/{step}/{expert}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.no_grad()
def resample_dead_latents(
    model: ExpertSAE,
    optimizer: torch.optim.Optimizer,
    tokens_since_fired_L: Tensor,
    dead_tokens: int,
    ctx: ParallelContext,
    rows_TC: Tensor,
    out: SAEOutput,
    seed: int,
    step: int,
) -> int:
    """Resample the dead latents of the local experts (those whose `tokens_since_fired_L` count reached
    `dead_tokens`; their counters are reset) from this step's batch (this rank's source rows `rows_TC`, [x | y] for a
    transcoder, and its `out`); return the number resampled over all experts (every rank returns the same)."""
    bank, width, d = model.experts, model.latents_per_expert, rows_TC.shape[1]
    _, y_TO = model.split_batch(rows_TC)
    expert_T = out.routing.expert_T if out.routing is not None else rows_TC.new_zeros(len(rows_TC), dtype=torch.long)
    error_T = (y_TO.float() - out.x_hat_TD.float()).pow(2).sum(1)
    # One gather of the global batch: its rows, their errors and first-choice experts (small ids: exact in float32).
    global_GC = ctx.gather_rows(torch.cat([rows_TC.float(), error_T[:, None], expert_T[:, None].float()], 1))
    rows_GC, error_G, expert_G = global_GC[:, :d], global_GC[:, d], global_GC[:, d + 1].long()
    x_GD, y_GO = model.split_batch(rows_GC)
    dead_NM = (tokens_since_fired_L >= dead_tokens).view(bank.num_local, width)
    expert_R, column_R, row_R = [], [], []
    for local, count in enumerate(dead_NM.sum(1).tolist()):
        if count == 0:
            continue
        expert = bank.first_expert + local
        rows_S = (expert_G == expert).nonzero().flatten()
        weights_S = error_G[rows_S].double().cpu()
        if not bool(weights_S.sum() > 0):  # no token of this expert in the batch (or no error): next time
            continue
        picks = torch.multinomial(weights_S, count, replacement=True, generator=resample_generator(seed, step, expert))
        expert_R.append(torch.full((count,), local, dtype=torch.long, device=rows_TC.device))
        column_R.append(dead_NM[local].nonzero().flatten())
        row_R.append(rows_S[picks.to(rows_S.device)])
    resampled = torch.zeros(1, dtype=torch.float64, device=rows_TC.device)
    if expert_R:
        expert_R, column_R, row_R = torch.cat(expert_R), torch.cat(column_R), torch.cat(row_R)
        encoder_RD = unit_rows(x_GD[row_R] - model.input_bias.float())
        decoder_RO = encoder_RD if y_GO is x_GD else unit_rows(y_GO[row_R] - model.output_bias.float())
        norms_NM = bank.w_enc.float().norm(dim=-1)
        live_NM = ~dead_NM
        live_mean_N = (norms_NM * live_NM).sum(1) / live_NM.sum(1).clamp_min(1)
        mean_N = torch.where(live_NM.any(1), live_mean_N, norms_NM.mean(1))
        encoder_norm_R = ENCODER_NORM_SCALE * mean_N[expert_R]
        model.reinit_latents_(expert_R, column_R, decoder_RO, encoder_RD * encoder_norm_R[:, None])
        reset_adam_rows_(optimizer, model.latent_parameters(), expert_R, column_R)
        tokens_since_fired_L.view(bank.num_local, width)[expert_R, column_R] = 0
        resampled += expert_R.numel()
    return int(ctx.all_reduce_sum(resampled)) // ctx.expert_replicas


def unit_rows(v_RD: Tensor) -> Tensor:
    """Each row scaled to unit norm (a zero row stays zero)."""
    return v_RD / v_RD.norm(dim=1, keepdim=True).clamp_min(1e-12)


def reset_adam_rows_(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], expert_R: Tensor, column_R: Tensor
) -> None:
    """Zero Adam's moments (exp_avg, exp_avg_sq: float32 or bfloat16 moments alike) at rows
    [expert_R, column_R] of `params`; the step counts stay."""
    for param in params:
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][expert_R, column_R] = 0
