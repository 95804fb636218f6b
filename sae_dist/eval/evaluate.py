"""Evaluate one SAE checkpoint, single process, on held-out data (SPEC section 6).

Activations come from the checkpoint's language model over a held-out region of text (by default the last 10% of
the documents of a dataset of known size, which a run that reads its documents in order sees last, if at all)
or, for runs trained on synthetic or cached activations, from that source (synthetic: a stream no training rank
draws; cache: the folder given, ideally a held-out cache). Over a window of tokens:
- MSE, FVU and L0 by `ReconstructionSums` (the one definition), dead latents (never active in the window);
- per expert: the share of tokens routed to it, its tokens' MSE, its dead latents;
- over the first `splice_batches` batches of contexts: the splice measures of `sae_dist.eval.splice`.
Each measure is also computed per batch (of `batch_contexts` contexts, or of `batch_tokens` activations), and its
error bar is the standard error of the batch values (std / sqrt(batches)). The headline value of a ratio
(FVU, FR) comes from the pooled sums; its error bar from the per-batch ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForCausalLM

from sae_dist.api import load_sae
from sae_dist.config import RunConfig
from sae_dist.data import SyntheticSource, TextContexts, build_activation_source, find_blocks, load_lm
from sae_dist.eval.metrics import ReconstructionSums
from sae_dist.eval.splice import MEASURE_CE, clean_pass, splice_measure, spliced_measures
from sae_dist.train.checkpoint import read_checkpoint_config, resolve_checkpoint

HELDOUT_RANK = 1_000_003
"""The synthetic stream of this rank id is never drawn by training (ranks are < world size)."""


@dataclass
class EvalConfig:
    window_tokens: int = 65536
    """Tokens over which MSE, FVU, L0, dead latents and per-expert numbers are measured (at least)."""
    splice_batches: int = 16
    """Batches of contexts (the first ones of the window) that also get the three splice passes."""
    batch_contexts: int = 8
    """Contexts per language-model batch."""
    batch_tokens: int = 4096
    """Activations per batch when the source is synthetic or a cache."""
    dataset: str | None = None
    """Text for the held-out region (None = the run's data.dataset)."""
    split: str | None = None
    """Dataset split (None = the run's)."""
    doc_offset: int | None = None
    """First document of the held-out region; None = the last `heldout_frac` of a dataset of known size, 0 for a
    stream (then pass an offset past the training documents, or a different split)."""
    heldout_frac: float = 0.1
    cache_dir: str | None = None
    """Activation cache to evaluate on for runs trained from a cache (None = the training cache: not held out)."""
    device: str = "cpu"


def mean_se(values: list[float]) -> tuple[float, float]:
    """(mean, standard error = sample std / sqrt(n)); the error is nan for fewer than 2 values."""
    t = torch.tensor(values, dtype=torch.float64)
    se = float(t.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(t.mean()), se


class WindowStats:
    """Reconstruction sums, firing and routing over the window, plus per-batch metric values."""

    def __init__(self, num_latents: int, num_experts: int):
        self.num_experts = num_experts
        self.latents_per_expert = num_latents // num_experts
        self.sums: ReconstructionSums | None = None
        self.expert_sums: list[ReconstructionSums | None] = [None] * num_experts
        self.fired_L = torch.zeros(num_latents, dtype=torch.bool)
        self.batch_metrics: list[dict[str, float]] = []

    def add(self, x_TD: Tensor, x_hat_TD: Tensor, values_TK: Tensor, indices_TK: Tensor) -> None:
        active_TK = values_TK > 0
        batch = ReconstructionSums.of_batch(x_TD, x_hat_TD, active_TK.sum())
        self.sums = batch if self.sums is None else self.sums + batch
        self.batch_metrics.append(batch.metrics())
        self.fired_L[indices_TK[active_TK].cpu()] = True
        # All k latents of a token lie in its expert, so the first id names the expert.
        expert_T = (indices_TK[:, 0] // self.latents_per_expert).cpu()
        for e in range(self.num_experts):
            rows = expert_T == e
            if rows.any():
                part = ReconstructionSums.of_batch(x_TD[rows], x_hat_TD[rows], active_TK[rows].sum())
                self.expert_sums[e] = part if self.expert_sums[e] is None else self.expert_sums[e] + part

    @property
    def tokens(self) -> int:
        return 0 if self.sums is None else int(self.sums.tokens)

    def report(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(reconstruction section, per-expert rows) of the report."""
        section: dict[str, Any] = {"tokens": self.tokens, "batches": len(self.batch_metrics)}
        for key, value in self.sums.metrics().items():
            section[key] = value
            section[f"{key}_se"] = mean_se([m[key] for m in self.batch_metrics])[1]
        section["dead_latents"] = int((~self.fired_L).sum())
        section["dead_window_tokens"] = self.tokens
        dead_NM = (~self.fired_L).view(self.num_experts, -1).sum(1)
        experts = []
        for e, sums in enumerate(self.expert_sums):
            tokens = 0 if sums is None else int(sums.tokens)
            experts.append({"expert": e, "load": tokens / max(self.tokens, 1), "tokens": tokens,
                            "mse": sums.metrics()["mse"] if sums is not None else float("nan"),
                            "dead_latents": int(dead_NM[e])})
        return section, experts


def load_eval_lm(run: RunConfig, device: str) -> tuple[nn.Module, Any]:
    """The run's language model with its LM head when its checkpoint has one (next-token CE), else the base
    model (embedding measure)."""
    model, tokenizer = load_lm(run.model, device)
    if any(name.endswith(("LMHeadModel", "ForCausalLM")) for name in model.config.architectures or []):
        model, tokenizer = load_lm(run.model, device, auto_class=AutoModelForCausalLM)
    return model, tokenizer


def heldout_contexts(run: RunConfig, tokenizer: Any, cfg: EvalConfig) -> tuple[TextContexts, dict[str, Any]]:
    """The held-out context stream and a description of it for the report."""
    data = replace(run.data, dataset=cfg.dataset or run.data.dataset, split=cfg.split or run.data.split)
    contexts = TextContexts.from_config(data, tokenizer)
    offset = cfg.doc_offset
    size = len(contexts.dataset) if hasattr(contexts.dataset, "__len__") else None
    if offset is None:
        offset = int(size * (1 - cfg.heldout_frac)) if size else 0
    contexts.seek({"epoch": 0, "doc": offset, "ctx": 0})
    return contexts, {"dataset": data.dataset, "split": data.split, "doc_offset": offset, "documents": size}


@torch.no_grad()
def evaluate_lm(sae: nn.Module, model: nn.Module, layer: int, contexts: TextContexts, pad_id: int,
                cfg: EvalConfig) -> tuple[WindowStats, list[dict[str, float]]]:
    """Window statistics and the per-batch splice measures over held-out contexts."""
    block = find_blocks(model)[layer]
    stats = WindowStats(sae.cfg.num_latents, sae.cfg.num_experts)
    splice_rows: list[dict[str, float]] = []
    while stats.tokens < cfg.window_tokens or len(splice_rows) < cfg.splice_batches:
        ids = [torch.tensor(contexts.next_context()) for _ in range(cfg.batch_contexts)]
        ids_BT = pad_sequence(ids, batch_first=True, padding_value=pad_id).to(cfg.device)
        mask_BT = pad_sequence([torch.ones_like(i) for i in ids], batch_first=True).to(cfg.device)
        clean_out, h_BTD = clean_pass(model, block, ids_BT, mask_BT)
        x_TD = h_BTD[mask_BT.bool()].float()
        latents = sae.encode(x_TD)
        x_hat_TD = sae.decode(latents)
        stats.add(x_TD, x_hat_TD, latents.values_TK, latents.indices_TK)
        if len(splice_rows) < cfg.splice_batches:
            splice_rows.append(spliced_measures(model, block, ids_BT, mask_BT, clean_out, x_hat_TD))
    return stats, splice_rows


@torch.no_grad()
def evaluate_activations(sae: nn.Module, run: RunConfig, cfg: EvalConfig) -> tuple[WindowStats, dict[str, Any]]:
    """Window statistics on the run's own activation source (synthetic or cache)."""
    if run.data.source == "synthetic":
        source = SyntheticSource.from_config(run.data, run.trainer.seed, rank=HELDOUT_RANK)
        described = {"source": "synthetic", "rank": HELDOUT_RANK, "held_out": True}
    else:
        held_out = cfg.cache_dir is not None
        run = replace(run, data=replace(run.data, cache_dir=cfg.cache_dir or run.data.cache_dir))
        source = build_activation_source(run)
        described = {"source": "cache", "cache_dir": run.data.cache_dir, "held_out": held_out}
    stats = WindowStats(sae.cfg.num_latents, sae.cfg.num_experts)
    while stats.tokens < cfg.window_tokens:
        x_TD = source.next_batch(cfg.batch_tokens).to(cfg.device)
        latents = sae.encode(x_TD)
        stats.add(x_TD, sae.decode(latents), latents.values_TK, latents.indices_TK)
    return stats, described


def summarise_splice(rows: list[dict[str, float]], measure: str) -> dict[str, Any]:
    """Means with standard errors of the per-batch splice measures; FR from the pooled means."""
    section: dict[str, Any] = {"measure": measure, "batches": len(rows)}
    for key in rows[0]:
        section[key], section[f"{key}_se"] = mean_se([r[key] for r in rows])
    if measure == MEASURE_CE:
        clean, rec, zero = section["ce_clean"], section["ce_reconstructed"], section["ce_zero_ablated"]
        section["fraction_recovered"] = (rec - zero) / (clean - zero)
    else:
        rec, zero = section["cosine_reconstructed"], section["cosine_zero_ablated"]
        section["fraction_recovered"] = (rec - zero) / (1 - zero)
    return section


def evaluate_checkpoint(path: str | Path, cfg: EvalConfig) -> dict[str, Any]:
    """The full report of the checkpoint at `path` (a checkpoint folder or run directory), JSON-ready."""
    folder = resolve_checkpoint(path)
    run, d_model, step = read_checkpoint_config(folder)
    sae = load_sae(folder, cfg.device)
    report: dict[str, Any] = {
        "checkpoint": str(folder), "step": step, "d_model": d_model,
        "sae": {"kind": run.sae.kind, "num_latents": run.sae.num_latents, "num_experts": run.sae.num_experts,
                "k": run.sae.k},
        "model": {"name": run.model.name, "layer": run.model.layer},
    }
    if run.data.source == "lm" or cfg.dataset is not None:
        model, tokenizer = load_eval_lm(run, cfg.device)
        contexts, report["data"] = heldout_contexts(run, tokenizer, cfg)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        stats, splice_rows = evaluate_lm(sae, model, run.model.layer, contexts, pad_id, cfg)
        report["splice"] = summarise_splice(splice_rows, splice_measure(model))
    else:
        stats, report["data"] = evaluate_activations(sae, run, cfg)
    report["reconstruction"], report["experts"] = stats.report()
    return report
