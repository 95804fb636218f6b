"""Automated interpretability of SAE latents against an OpenAI-compatible endpoint (e.g. `vllm serve MODEL`):

    python launch/autointerp.py CHECKPOINT --base-url http://HOST:8000/v1 --model MODEL --out autointerp.json

Collects the latents' activations over the training text (as launch/inspect_features.py does), asks the model to
explain each latent from its top contexts, scores each explanation by detection, and writes a JSON with the
explanations, the balanced accuracy per latent and per activation quantile, and their mean. The API key, if the
endpoint needs one, is read from the environment variable named by --api-key-env.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from pathlib import Path

from sae_dist.cli import check_inspection, check_output, fail, one_line_errors, require_positive
from sae_dist.eval.autointerp import AutoInterpConfig, run_autointerp
from sae_dist.eval.inspect import inspect_checkpoint
from sae_dist.run_dir import write_atomically

PROBE_TIMEOUT_S = 10.0


def check_endpoint(base_url: str) -> None:
    """The endpoint answers HTTP at all (any status counts): checked before the language model is loaded."""
    try:
        urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        fail(f"--base-url={base_url} does not answer ({getattr(exc, 'reason', exc)})")


def main() -> None:
    defaults = AutoInterpConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run directory (its latest checkpoint) or a checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--base-url", default=defaults.base_url)
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--api-key-env", default=defaults.api_key_env)
    parser.add_argument("--latents", type=int, nargs="+", help="global latent ids (default: a sample per expert)")
    parser.add_argument("--per-expert", type=int, default=4)
    parser.add_argument("--contexts", type=int, default=2000, help="contexts of the text stream to scan")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    cfg = AutoInterpConfig(base_url=args.base_url, model=args.model, api_key_env=args.api_key_env, seed=args.seed)
    with one_line_errors():
        require_positive(vars(args), "per_expert", "contexts")
        check_inspection(args.checkpoint, args.latents)
        check_output(args.out.parent, "--out")
        check_endpoint(args.base_url)
        records = inspect_checkpoint(args.checkpoint, args.latents, args.per_expert, args.contexts, args.seed,
                                     args.device)
        try:
            result = run_autointerp(records, cfg)
        except (urllib.error.URLError, OSError) as exc:
            fail(f"--base-url={args.base_url} failed during the run ({getattr(exc, 'reason', exc)})")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(args.out, json.dumps(result, indent=1).encode())
    scored = len(result["latents"])
    print(f"mean balanced accuracy {result['mean_balanced_accuracy']} over {scored} latents: {args.out}")


if __name__ == "__main__":
    main()
