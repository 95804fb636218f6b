"""Plot run directories: `python launch/plot.py RUN_DIR [RUN_DIR ...] --out DIR`.

Writes into DIR: pareto.png (MSE vs L0), scaling.png (MSE vs training FLOPs, the paper's encoder-only count),
expert_load.png (Switch runs) and similarity_<run>.png for each run with a geometry.json (launch/analyze.py).
Each run's metrics come from eval.json in its latest checkpoint when present, else its last logged training row.
"""

from __future__ import annotations

from sae_dist.cli import check_checkpoint, check_output, command_parser, one_line_errors, say_output
from sae_dist.eval.plots import plot_runs
from sae_dist.eval.runs import load_run_point
from sae_dist.run_dir import latest_checkpoint


def main() -> None:
    parser = command_parser(__doc__)
    parser.add_argument("run_dirs", nargs="+", help="run directories (trainer.out_dir of each run)")
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    args = parser.parse_args()
    with one_line_errors():
        for run_dir in args.run_dirs:
            if latest_checkpoint(run_dir) is not None:
                check_checkpoint(run_dir)
            load_run_point(run_dir)  # a run folder with metrics, said before the output folder is
        say_output(check_output(args.out, "--out"))
        written = plot_runs(args.run_dirs, args.out)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
