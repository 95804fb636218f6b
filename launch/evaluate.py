"""Evaluate an SAE checkpoint: `python launch/evaluate.py CHECKPOINT_OR_RUN_DIR [options]`.

Prints a table and writes eval.json (default: into the checkpoint folder, where launch/plot.py reads it; written
to a temporary file, then renamed). The measures and the held-out data are described in
sae_dist/eval/evaluate.py (a transcoder's: FVU of its target, and its output spliced in at the target site);
`--help` lists the options with their defaults.
Checkpoints of expert-parallel runs are evaluated the same way (they are exported as one file).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sae_dist.cli import (
    add_config_options,
    check_checkpoint,
    check_output,
    command_parser,
    fail,
    one_line_errors,
    require_positive,
    say_output,
)
from sae_dist.config import SAMPLE_BY
from sae_dist.eval.evaluate import EvalConfig, evaluate
from sae_dist.eval.splice import MEASURE_CE
from sae_dist.run_dir import EVAL_FILE, write_atomically


def _pm(section: dict, key: str, digits: int = 4) -> str:
    """'value ± se' of a report entry."""
    se = section.get(f"{key}_se")
    value = f"{section[key]:.{digits}f}"
    return value if se is None or math.isnan(se) else f"{value} ± {se:.{digits}f}"


def print_report(report: dict) -> None:
    console = Console()
    sae, rec = report["sae"], report["reconstruction"]
    target = report["model"].get("target_hookpoint")
    what = f"transcoder {report['model']['hookpoint']} -> {target}" if target else "SAE"
    table = Table(title=f"{sae['kind']} {what} M={sae['num_latents']} N={sae['num_experts']} k={sae['k']}, "
                        f"step {report['step']}  (± standard error over batches)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    data = report["data"]
    table.add_row("held-out data", ", ".join(f"{k}={v}" for k, v in data.items()))
    table.add_row("tokens / batches", f"{rec['tokens']:,} / {rec['batches']}")
    table.add_row("MSE (sum over dims)", _pm(rec, "mse", 3))
    table.add_row("FVU of the target y" if target else "FVU", _pm(rec, "fvu"))
    table.add_row("L0", _pm(rec, "l0", 2))
    table.add_row(f"dead latents (window {rec['dead_window_tokens']:,} tokens)",
                  f"{rec['dead_latents']:,} / {sae['num_latents']:,}")
    splice = report.get("splice")
    if splice is not None:
        table.add_row("splice measure", f"{splice['measure']} ({splice['batches']} batches)")
        keys = (["ce_clean", "ce_reconstructed", "ce_zero_ablated", "delta_ce", "kl_reconstructed",
                 "kl_zero_ablated"] if splice["measure"] == MEASURE_CE
                else ["cosine_reconstructed", "cosine_zero_ablated"])
        for key in keys + ["fraction_recovered"]:
            table.add_row(key.replace("_", " "), _pm(splice, key))
    console.print(table)
    if sae["num_experts"] > 1:
        experts = Table(title="per expert", caption="top-e: a token counts in all its e experts")
        for column in ("expert", "load", "tokens", "MSE", "L0", "dead"):
            experts.add_column(column, justify="right")
        for row in report["experts"]:
            experts.add_row(str(row["expert"]), f"{row['load']:.3f}", f"{row['tokens']:,}", f"{row['mse']:.3f}",
                            f"{row['l0']:.2f}", f"{row['dead_latents']:,}")
        console.print(experts)


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(__doc__)
    parser.add_argument("path", help="a checkpoint folder or a run directory (its latest checkpoint)")
    parser.add_argument("--out", type=Path, help=f"the JSON file (default: CHECKPOINT/{EVAL_FILE})")
    add_config_options(parser, EvalConfig(), {"doc_offset": int})
    args = vars(parser.parse_args(argv))
    path, out = args.pop("path"), args.pop("out")
    with one_line_errors():
        require_positive(args, "batches", "batch_tokens", "splice_batch_contexts")
        if not 0 < args["heldout_frac"] < 1:
            fail(f"--heldout-frac={args['heldout_frac']} must be in (0, 1)")
        if args["sample_by"] not in (None, *SAMPLE_BY):
            fail(f"--sample-by={args['sample_by']} is not one of {', '.join(SAMPLE_BY)}")
        folder, _ = check_checkpoint(path)
        out = out or folder / EVAL_FILE
        say_output(check_output(out.parent, "--out"))
        report = evaluate(folder, **args)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out, json.dumps(report, indent=1).encode())
    print_report(report)
    done, asked = report["reconstruction"]["batches"], report["data"]["batches_requested"]
    if done < asked:
        print(f"warning: the held-out region ran out after {done} of {asked} batches", file=sys.stderr)
    print(out)


if __name__ == "__main__":
    main()
