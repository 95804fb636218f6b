"""The closing table of a training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sae_dist.config import RunConfig
from sae_dist.flops import flops_per_token


def format_load(load: list[float]) -> str:
    return " ".join(f"{share:.2f}" for share in load)


def print_summary(
    run: RunConfig,
    d_model: int,
    last: dict[str, Any],
    evaluation: dict[str, float],
    tokens_per_s: float,
    checkpoint: Path | None,
) -> None:
    """The closing table: final metrics over fresh batches, dead latents, load, cost and where the weights are."""
    sae = run.sae
    flops = flops_per_token(sae, d_model)
    table = Table(title=f"{sae.kind} SAE: M={sae.num_latents}, N={sae.num_experts}, k={sae.k}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("steps / tokens", f"{last.get('step', 0)} / {last.get('tokens', 0):,}")
    table.add_row("MSE (fresh batches)", f"{evaluation['mse']:.4g}")
    table.add_row("FVU", f"{evaluation['fvu']:.4f}")
    table.add_row("L0", f"{evaluation['l0']:.2f}")
    table.add_row(f"dead latents (> {sae.dead_tokens:.0e} tokens)", f"{last.get('dead', 'n/a')} / {sae.num_latents}")
    if "resampled" in last:
        table.add_row(f"latents resampled (every {sae.resample_every} steps)", f"{last['resampled']:,}")
    if "expert_load" in last:
        table.add_row("expert load", format_load(last["expert_load"]))
    if "drop_fraction" in last:
        table.add_row("dropped by capacity", f"{last['drop_fraction']:.2%}")
    table.add_row("tokens/s (run average)", f"{tokens_per_s:,.0f}")
    table.add_row("FLOPs/token: paper | sae-dist", f"{flops.encoder_paper:.3g} | {flops.total:.3g}")
    console = Console()
    console.print(table)
    if checkpoint is not None:
        # Outside the table so that a long path is never cut.
        console.print(f"checkpoint: {checkpoint}", soft_wrap=True)
