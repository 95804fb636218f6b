"""Feature geometry of a trained SAE: `python launch/analyze.py CHECKPOINT_OR_RUN_DIR [--out DIR] [--tsne]`.

Writes geometry.json (nearest-neighbour cosines within and across experts, the duplicate fraction, the
expert-by-expert similarity matrix; definitions in sae_dist/eval/geometry.py) into the checkpoint folder, where
launch/plot.py finds it, or into --out; plus similarity.png and, with --tsne (needs scikit-learn), tsne.png.
Bad options (and --tsne without scikit-learn) are refused before the SAE is loaded.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from sae_dist.api import load_sae
from sae_dist.cli import (
    check_checkpoint,
    check_output,
    command_parser,
    fail,
    one_line_errors,
    require_positive,
    say_output,
)
from sae_dist.eval.geometry import expert_rows, geometry, plot_tsne, tsne_2d
from sae_dist.eval.plots import plot_similarity, run_label
from sae_dist.run_dir import GEOMETRY_FILE, checkpoint_title, write_atomically


def print_summary(summary: dict, title: str) -> None:
    table = Table(title=title)
    for column in ("decoder rows", "mean", "p10", "median", "p90"):
        table.add_column(column, justify="left" if column == "decoder rows" else "right")
    for key, label in (("within_expert_nn_cosine", "NN cosine within expert"),
                       ("across_expert_nn_cosine", "NN cosine across experts")):
        s = summary[key]
        if s is not None:
            table.add_row(label, *(f"{s[q]:.3f}" for q in ("mean", "p10", "median", "p90")))
    table.caption = f"{summary['num_latents']} latents, {summary['num_experts']} experts"
    if summary["duplicate_fraction"] is not None:
        sim_NN = torch.tensor(summary["expert_similarity"])
        off_diagonal = sim_NN[~torch.eye(len(sim_NN), dtype=torch.bool)]
        table.caption += (f"; duplicates (across cosine > {summary['duplicate_threshold']}): "
                          f"{summary['duplicate_fraction']:.2%}, per expert {summary['duplicates_per_expert']}; "
                          f"expert similarity: diagonal {float(sim_NN.diagonal().mean()):.3f}, "
                          f"off-diagonal {float(off_diagonal.mean()):.3f}")
    Console().print(table)


def main() -> None:
    parser = command_parser(__doc__)
    parser.add_argument("path", help="a checkpoint folder or a run directory (its latest checkpoint)")
    parser.add_argument("--out", type=Path, help="output folder (default: the checkpoint folder)")
    parser.add_argument("--chunk", type=int, help="rows compared with all M at a time (default: 2^24 / M)")
    parser.add_argument("--device", default="cpu", help="where the cosines are computed ('cpu', 'cuda')")
    parser.add_argument("--tsne", action="store_true", help="also a t-SNE of encoder and decoder rows (scikit-learn)")
    parser.add_argument("--tsne-points", type=int, default=4000, help="rows in the t-SNE, sampled evenly over experts")
    args = parser.parse_args()
    with one_line_errors():
        require_positive(vars(args), "chunk", "tsne_points")
        if args.tsne and importlib.util.find_spec("sklearn") is None:
            fail("--tsne needs scikit-learn, which is not installed (pip install scikit-learn)")
        folder, run = check_checkpoint(args.path)
        out = args.out or folder
        say_output(check_output(out, "--out"))
        sae = load_sae(folder, args.device)
        summary = geometry(expert_rows(sae, "decoder"), args.chunk).summary()
        summary["checkpoint"] = str(folder)
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / GEOMETRY_FILE, json.dumps(summary, indent=1).encode())
    print_summary(summary, f"decoder geometry: {folder}")
    title = "expert similarity\n" + run_label(checkpoint_title(folder), run)
    written = [out / GEOMETRY_FILE, plot_similarity(summary["expert_similarity"], out / "similarity.png", title)]
    if args.tsne:
        embeddings = {which: tsne_2d(expert_rows(sae, which), args.tsne_points)
                      for which in tqdm(("encoder", "decoder"), desc="t-SNE", unit="embedding")}
        written.append(plot_tsne(embeddings, out / "tsne.png", run_label(checkpoint_title(folder), run)))
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
