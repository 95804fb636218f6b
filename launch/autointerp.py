"""Automated interpretability of SAE latents against an OpenAI-compatible endpoint (e.g. `vllm serve MODEL`):

    python launch/autointerp.py CHECKPOINT_OR_RUN_DIR --base-url http://HOST:8000/v1 --model MODEL [--out FILE]

Collects the latents' activations over the training text (as launch/inspect_features.py does), asks the model to
explain each latent from its top contexts, scores each explanation by detection, and writes a JSON (default:
CHECKPOINT/autointerp.json) with the explanations, the balanced accuracy per latent and per activation quantile,
and their mean. The endpoint is asked for its models before anything is loaded: one that does not answer, or does
not serve --model, is a one-line error. The API key, if the endpoint needs one, is read from the environment
variable named by --api-key-env.
"""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

from sae_dist.cli import (
    add_config_options,
    check_output,
    command_parser,
    fail,
    one_line_errors,
    require_positive,
    say_output,
)
from sae_dist.cli_inspection import check_inspection
from sae_dist.eval.autointerp import AutoInterpConfig, ChatClient, run_autointerp
from sae_dist.eval.inspect import inspect_checkpoint
from sae_dist.run_dir import write_atomically

AUTOINTERP_FILE = "autointerp.json"
PROBE_TIMEOUT_S = 10.0


def check_endpoint(cfg: AutoInterpConfig) -> None:
    """The endpoint answers and serves `cfg.model` (when it lists its models): checked before anything is loaded."""
    try:
        served = ChatClient(cfg).served_models(PROBE_TIMEOUT_S)
    except urllib.error.HTTPError:
        return  # it answers; a server without GET /models may still serve chat completions
    except (urllib.error.URLError, OSError, ValueError) as exc:
        fail(f"--base-url={cfg.base_url} does not answer ({getattr(exc, 'reason', exc)}); start the server "
             "(e.g. `vllm serve MODEL`) or pass the URL of one that runs")
    if served is not None and cfg.model not in served:
        fail(f"--model={cfg.model} is not served by --base-url={cfg.base_url} (it serves: {', '.join(served)})")


def main() -> None:
    parser = command_parser(__doc__)
    parser.add_argument("checkpoint", help="a run directory (its latest checkpoint) or a checkpoint folder")
    parser.add_argument("--out", type=Path, help=f"the JSON file to write (default: CHECKPOINT/{AUTOINTERP_FILE})")
    parser.add_argument("--latents", type=int, nargs="+", help="global latent ids (default: a sample per expert)")
    parser.add_argument("--per-expert", type=int, default=4, help="latents sampled per expert without --latents")
    parser.add_argument("--contexts", type=int, default=2000, help="contexts of the text stream to scan")
    parser.add_argument("--device", default="cpu", help="where the language model and the SAE run")
    add_config_options(parser, AutoInterpConfig())
    args = vars(parser.parse_args())
    tool = {name: args.pop(name) for name in ("checkpoint", "out", "latents", "per_expert", "contexts", "device")}
    cfg = AutoInterpConfig(**args)
    with one_line_errors():
        require_positive({**tool, **args}, "per_expert", "contexts", "explain_contexts", "quantiles",
                         "per_quantile", "excerpts_per_prompt", "max_tokens", "timeout_s")
        folder, _ = check_inspection(tool["checkpoint"], tool["latents"])
        out = tool["out"] or folder / AUTOINTERP_FILE
        out_folder = check_output(out.parent, "--out")
        check_endpoint(cfg)
        say_output(out_folder)
        records = inspect_checkpoint(tool["checkpoint"], tool["latents"], tool["per_expert"], tool["contexts"],
                                     cfg.seed, tool["device"])
        try:
            result = run_autointerp(records, cfg)
        except (urllib.error.URLError, OSError) as exc:
            fail(f"--base-url={cfg.base_url} failed during the run ({getattr(exc, 'reason', exc)})")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out, json.dumps(result, indent=1).encode())
    scored = len(result["latents"])
    print(f"mean balanced accuracy {result['mean_balanced_accuracy']} over {scored} latents: {out}")


if __name__ == "__main__":
    main()
