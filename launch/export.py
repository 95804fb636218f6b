"""Export a trained SAE to another tool's format: `python launch/export.py RUN_DIR --format saelens --out DIR`.

RUN_DIR is a run directory (its latest checkpoint) or a checkpoint folder. --format saelens writes cfg.json and
sae_weights.safetensors into DIR (a new folder), loadable with sae_lens's `SAE.load_from_disk(DIR)`: dense TopK
and ReLU SAEs as SAELens's 'topk' and 'standard' SAEs, a dense BatchTopK SAE as 'jumprelu', a Switch SAE (TopK or
BatchTopK experts) as 'sae_dist_switch' (first `import sae_dist.interop.saelens_switch`); with --per-expert, a
Switch SAE as N 'topk' ('jumprelu' for BatchTopK experts) SAEs in DIR/expert_NNN. A transcoder exports as the
transcoder form of the same ('transcoder', 'jumprelu_transcoder', 'sae_dist_switch_transcoder', a dense TopK one
with N = 1; 'skip_transcoder' for 'transcoder' with the skip).
"""

from __future__ import annotations

from pathlib import Path

from sae_dist.api import load_sae
from sae_dist.cli import check_checkpoint, check_output, command_parser, fail, one_line_errors, say_output
from sae_dist.interop.saelens import check_export, export_saelens

FORMATS = ("saelens",)


def main() -> None:
    parser = command_parser(__doc__)
    parser.add_argument("path", help="a checkpoint folder or a run directory (its latest checkpoint)")
    parser.add_argument("--format", default="saelens", help=f"output format; allowed: {', '.join(FORMATS)}")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist yet)")
    parser.add_argument("--per-expert", action="store_true",
                        help="a Switch SAE as one standard SAE per expert (DIR/expert_NNN): 'topk', or "
                             "'jumprelu' for BatchTopK experts")
    args = parser.parse_args()
    with one_line_errors():
        if args.format not in FORMATS:
            fail(f"--format={args.format!r} is unknown; allowed: {', '.join(FORMATS)}")
        if args.out.exists():
            fail(f"--out={args.out} already exists; name a new folder")
        folder, run = check_checkpoint(args.path)
        try:
            check_export(run, args.per_expert)
        except ValueError as exc:
            fail(exc)
        say_output(check_output(args.out.parent, "--out"))
        sae = load_sae(folder)
        try:
            written = export_saelens(sae, run, args.out, args.per_expert)
        except (ValueError, NotImplementedError) as exc:
            fail(exc)
        print(f"wrote {len(written)} SAELens SAE folder{'s' if len(written) > 1 else ''} in {args.out}")


if __name__ == "__main__":
    main()
