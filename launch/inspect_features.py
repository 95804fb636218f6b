"""Inspect SAE latents: `python launch/inspect_features.py CHECKPOINT --out DIR [--latents 3 17 ...]`.

Without --latents, samples --per-expert random latents of each expert. Runs the first --contexts contexts of the
text the SAE was trained on (for a cache-trained run, the text named in the cache's manifest) through the language
model and the SAE, and writes DIR/features.html (a header naming the checkpoint, the site and the text, an index of
the latents with their firing rates, and each latent's top contexts with the active tokens shaded by activation),
DIR/features.txt (the same as text, active tokens in «»), and DIR/histograms.png.
"""

from __future__ import annotations

from sae_dist.cli import check_output, command_parser, one_line_errors, require_positive, say_output
from sae_dist.cli_inspection import check_inspection
from sae_dist.eval.inspect import inspect_checkpoint, write_report


def main() -> None:
    parser = command_parser(__doc__)
    parser.add_argument("checkpoint", help="a run directory (its latest checkpoint) or a checkpoint folder")
    parser.add_argument("--out", required=True, help="folder for features.html, features.txt and histograms.png")
    parser.add_argument("--latents", type=int, nargs="+", help="global latent ids (default: a sample per expert)")
    parser.add_argument("--per-expert", type=int, default=4, help="latents sampled per expert without --latents")
    parser.add_argument("--contexts", type=int, default=1000, help="contexts of the text stream to scan")
    parser.add_argument("--top", type=int, default=10, help="contexts shown per latent")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent sample")
    parser.add_argument("--device", default="cpu", help="where the language model and the SAE run")
    args = parser.parse_args()
    with one_line_errors():
        require_positive(vars(args), "per_expert", "contexts", "top")
        check_inspection(args.checkpoint, args.latents)
        say_output(check_output(args.out, "--out"))
        records = inspect_checkpoint(args.checkpoint, args.latents, args.per_expert, args.contexts, args.seed,
                                     args.device)
        written = write_report(records, args.out, args.top)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
