"""The closing table of a training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sae_dist.config import RunConfig


def format_load(load: list[float]) -> str:
    return " ".join(f"{share:.2f}" for share in load)


def print_summary(
    run: RunConfig, last: dict[str, Any], evaluation: dict[str, float], num_dead: int, checkpoint: Path | None
) -> None:
    sae = run.sae
    table = Table(title=f"{sae.kind} SAE: M={sae.num_latents}, N={sae.num_experts}, k={sae.k}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("steps / tokens", f"{last.get('step', 0)} / {last.get('tokens', 0):,}")
    table.add_row("MSE (held-out batches)", f"{evaluation['mse']:.4g}")
    table.add_row("FVU", f"{evaluation['fvu']:.4f}")
    table.add_row("L0", f"{evaluation['l0']:.2f}")
    table.add_row(f"dead latents (> {sae.dead_tokens:,} tokens)", f"{last.get('dead', num_dead)} / {sae.num_latents}")
    if "expert_load" in last:
        table.add_row("expert load (last step)", format_load(last["expert_load"]))
    if "drop_fraction" in last:
        table.add_row("dropped by capacity (last step)", f"{last['drop_fraction']:.2%}")
    if "tokens_per_s" in last:
        table.add_row("tokens/s (last window)", f"{last['tokens_per_s']:,.0f}")
    if checkpoint is not None:
        table.add_row("checkpoint", str(checkpoint))
    Console().print(table)
