"""Automated interpretability (the paper's protocol) against any OpenAI-compatible chat endpoint (vLLM, ...).

1. Explain: an LLM reads a latent's top-activating contexts, active tokens marked «like this», and answers with a
   short explanation.
2. Detection: the LLM gets the explanation and a shuffled mix of activating contexts (sampled evenly from the
   quantiles of the latent's per-context maximum activation) and non-activating contexts, shown unmarked, and says
   which ones activate. Balanced accuracy = (TPR + TNR) / 2, overall and per activation quantile (the positives of
   that quantile against all negatives).
All sampling uses `AutoInterpConfig.seed`, so the same records and seed give the same prompts.
"""

from __future__ import annotations

import json
import os
import random
import re
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

from tqdm.auto import tqdm

from sae_dist.eval.inspect import ActivationRecords, mark_text

EXPLAIN_SYSTEM = (
    "You are an interpretability researcher. You will see text excerpts in which one feature of a neural network "
    "is active; the tokens where it is active are marked like «this». Describe in one short phrase what the feature "
    "detects. Answer with the phrase only."
)
DETECT_SYSTEM = (
    "You are an interpretability researcher. You will see the explanation of a feature of a neural network and "
    "numbered text excerpts. Decide for each excerpt whether the feature is active anywhere in it. Answer with the "
    "numbers of the excerpts where it is active, comma-separated, or 'none'."
)


@dataclass
class AutoInterpConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    """The OpenAI-compatible API root; requests go to {base_url}/chat/completions."""
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    """The model the endpoint serves that explains and judges."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (unset = no Authorization header, as a local vLLM accepts)."""
    explain_contexts: int = 10
    """Top-activating contexts shown to the explainer."""
    quantiles: int = 5
    """Activation quantiles the detection positives are drawn from."""
    per_quantile: int = 2
    """Activating contexts drawn from each quantile."""
    negatives: int = 10
    """Non-activating contexts in the detection test."""
    excerpts_per_prompt: int = 10
    """Excerpts shown in one detection prompt."""
    seed: int = 0
    """Seed of every sampling step (latents, detection contexts, their order)."""
    temperature: float = 0.0
    """Sampling temperature of the explainer and the judge (0: their most likely answer)."""
    max_tokens: int = 200
    """Longest answer, in tokens."""
    timeout_s: float = 60.0
    """Seconds to wait for one answer."""


class ChatClient:
    """Minimal client of POST {base_url}/chat/completions (stdlib only)."""

    def __init__(self, cfg: AutoInterpConfig) -> None:
        self.cfg = cfg
        self.api_key = os.environ.get(cfg.api_key_env)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def served_models(self, timeout_s: float) -> list[str] | None:
        """The model ids GET {base_url}/models lists (None when the answer is not an OpenAI model list); raises
        urllib's URLError (HTTPError for an HTTP status) when the endpoint does not answer."""
        request = urllib.request.Request(self.cfg.base_url.rstrip("/") + "/models", headers=self._headers())
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            try:
                return [str(entry["id"]) for entry in json.loads(response.read())["data"]]
            except (ValueError, KeyError, TypeError):
                return None

    def complete(self, system: str, user: str) -> str:
        body = {
            "model": self.cfg.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }
        request = urllib.request.Request(
            self.cfg.base_url.rstrip("/") + "/chat/completions", json.dumps(body).encode(), self._headers(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
            reply = json.loads(response.read())
        return reply["choices"][0]["message"]["content"].strip()


def _excerpt(records: ActivationRecords, context: int, latent: int, marked: bool) -> str:
    pieces = records.pieces(context)
    text = mark_text(pieces, records.context_acts(context, latent)) if marked else "".join(pieces)
    return " ".join(text.split())  # one line per excerpt


def explain_prompt(records: ActivationRecords, latent: int, n: int) -> str:
    lines = [f"{i + 1}. {_excerpt(records, c, latent, marked=True)}"
             for i, c in enumerate(records.top_contexts(latent, n))]
    return "Excerpts:\n" + "\n".join(lines)


def detection_sample(records: ActivationRecords, latent: int, cfg: AutoInterpConfig) -> list[tuple[int, int | None]]:
    """Shuffled (context, quantile) pairs: activating contexts drawn from each activation quantile (quantile 0 =
    weakest), and non-activating ones (quantile None). The contexts shown to the explainer are left out."""
    rng = random.Random(f"{cfg.seed}:{latent}")
    max_C = records.max_CL()[:, records.column(latent)]
    shown = set(records.top_contexts(latent, cfg.explain_contexts))
    active = sorted((c for c in range(len(max_C)) if max_C[c] > 0 and c not in shown), key=lambda c: float(max_C[c]))
    sample: list[tuple[int, int | None]] = []
    for q in range(cfg.quantiles):
        bin_ = active[q * len(active) // cfg.quantiles : (q + 1) * len(active) // cfg.quantiles]
        sample += [(c, q) for c in rng.sample(bin_, min(cfg.per_quantile, len(bin_)))]
    inactive = [c for c in range(len(max_C)) if max_C[c] <= 0]
    sample += [(c, None) for c in rng.sample(inactive, min(cfg.negatives, len(inactive)))]
    rng.shuffle(sample)
    return sample


def parse_selection(answer: str, count: int) -> set[int]:
    """0-based indices of the excerpts named in an answer like '2, 5' (numbers outside 1..count ignored)."""
    return {int(n) - 1 for n in re.findall(r"\d+", answer) if 1 <= int(n) <= count}


def balanced_accuracy(predicted: list[bool], actual: list[bool]) -> float | None:
    """(TPR + TNR) / 2; None without both positives and negatives."""
    positives = [p for p, a in zip(predicted, actual, strict=True) if a]
    negatives = [not p for p, a in zip(predicted, actual, strict=True) if not a]
    if not positives or not negatives:
        return None
    return (sum(positives) / len(positives) + sum(negatives) / len(negatives)) / 2


def score_detection(judged: list[dict[str, Any]], quantiles: int) -> dict[str, Any]:
    """Balanced accuracy overall and per quantile from [{'quantile': q | None, 'predicted': bool}, ...]."""
    actual = [j["quantile"] is not None for j in judged]
    predicted = [j["predicted"] for j in judged]
    per_quantile = []
    for q in range(quantiles):
        keep = [j["quantile"] in (q, None) for j in judged]
        per_quantile.append(balanced_accuracy([p for p, k in zip(predicted, keep) if k],
                                              [a for a, k in zip(actual, keep) if k]))
    return {"balanced_accuracy": balanced_accuracy(predicted, actual), "per_quantile": per_quantile}


def interpret_latent(client: ChatClient, records: ActivationRecords, latent: int, cfg: AutoInterpConfig) -> dict:
    """Explain one latent, then run the detection test on its explanation."""
    explanation = client.complete(EXPLAIN_SYSTEM, explain_prompt(records, latent, cfg.explain_contexts))
    sample = detection_sample(records, latent, cfg)
    judged = []
    for start in range(0, len(sample), cfg.excerpts_per_prompt):
        chunk = sample[start : start + cfg.excerpts_per_prompt]
        excerpts = "\n".join(f"{i + 1}. {_excerpt(records, c, latent, marked=False)}" for i, (c, _) in enumerate(chunk))
        answer = client.complete(DETECT_SYSTEM, f"Explanation: {explanation}\n\nExcerpts:\n{excerpts}")
        selected = parse_selection(answer, len(chunk))
        judged += [{"context": c, "quantile": q, "predicted": i in selected} for i, (c, q) in enumerate(chunk)]
    expert = records.experts[records.column(latent)]
    return {"latent": latent, "expert": expert, "explanation": explanation, **score_detection(judged, cfg.quantiles),
            "judged": judged}


def run_autointerp(records: ActivationRecords, cfg: AutoInterpConfig) -> dict[str, Any]:
    """Explain and score every latent in `records` that fires; the mean balanced accuracy over the scored ones."""
    client = ChatClient(cfg)
    max_CL = records.max_CL()
    firing = [latent for latent in records.latents if max_CL[:, records.column(latent)].max() > 0]
    results = [interpret_latent(client, records, latent, cfg)
               for latent in tqdm(firing, desc="explain + detect", unit="latent")]
    scored = [r["balanced_accuracy"] for r in results if r["balanced_accuracy"] is not None]
    return {"config": asdict(cfg), "mean_balanced_accuracy": sum(scored) / len(scored) if scored else None,
            "latents": results}
