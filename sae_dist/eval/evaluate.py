"""Evaluate one SAE checkpoint, single process, on held-out data (docs/math.md section 6).

Held-out data, by the run's source:
- lm: the checkpoint's language model over the last `heldout_frac` (10%) of the documents of a dataset of known size
  (`doc_offset` overrides the start; a streamed dataset starts at 0, so pass an offset past the training documents
  or another split). Training reads documents in order from the first, so a run that read fewer tokens than precede
  the region never saw it. The region is read once, never wrapped around into the training documents: when it runs
  out, fewer batches are evaluated and the report says so.
- synthetic: the generator stream of a rank id no training rank has (the same distribution, different draws);
- cache: the folder `cache_dir` (ideally a held-out cache; without it the training cache, reported as not held out).

Measured:
- over `batches` batches of at least `batch_tokens` activations (lm: whole contexts): MSE, FVU and L0 (of a
  transcoder's target y, read at `model.target_hookpoint` in the same pass) by
  `ReconstructionSums` (the one definition), dead latents (never active in the window of all batches), and per
  expert its load, its tokens' MSE, their L0 in its latents and its dead latents (`WindowStats`: under top-e routing
  a token counts once for each of its e experts);
- lm only, over the first `splice_contexts` contexts of the region in batches of `splice_batch_contexts`: the splice
  measures of `sae_dist.eval.splice` (next-token CE for a causal LM, pooled-embedding cosine otherwise); a
  transcoder's output replaces its target site, computed from the input site of the same pass.
Error bars are standard errors of the per-batch values (std / sqrt(batches)). The headline value of a ratio (FVU, FR)
comes from the pooled sums (or means); its error bar from the per-batch ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from sae_dist.api import load_sae
from sae_dist.config import RunConfig
from sae_dist.data import HookedLM, Site, SyntheticSource, TextContexts, build_activation_source, load_lm, run_sites
from sae_dist.data.sites import site_module
from sae_dist.data.source import DataUnavailableError
from sae_dist.eval.splice import MEASURE_CE, clean_pass, splice_measure, spliced_measures, transcoded_measures
from sae_dist.metrics import ReconstructionSums
from sae_dist.models import SAE
from sae_dist.run_dir import read_checkpoint_config, resolve_checkpoint

HELDOUT_RANK = 1_000_003
"""The synthetic stream of this rank id is never drawn by training (ranks are < world size)."""


@dataclass
class EvalConfig:
    batches: int = 20
    """Batches of activations evaluated; error bars are standard errors over them."""
    batch_tokens: int = 2048
    """Activations per batch (lm source: whole contexts until the batch holds at least this many tokens)."""
    splice_contexts: int = 64
    """Held-out contexts that also get the three splice passes (lm source only)."""
    splice_batch_contexts: int = 8
    """Contexts per splice batch: one error-bar sample each."""
    dataset: str | None = None
    """Text for the held-out region (None = the run's data.dataset)."""
    split: str | None = None
    """Dataset split (None = the run's)."""
    data_files: str | None = None
    """Local files of the held-out text, a path or glob, e.g. with --dataset text (None = the run's data.data_files)."""
    sample_by: str | None = None
    """What one document of a text builder is: 'line', 'paragraph' or 'document', a whole file (None = the run's)."""
    doc_offset: int | None = None
    """First document of the held-out region; None = the last `heldout_frac` of a dataset of known size, 0 for a
    stream."""
    heldout_frac: float = 0.1
    """Fraction of a dataset of known size, at its end, that is the held-out region (when doc_offset is None)."""
    cache_dir: str | None = None
    """Activation cache to evaluate on for runs trained from a cache (None = the training cache: not held out)."""
    device: str = "cpu"
    """Where the SAE and the language model run ('cpu', 'cuda', 'cuda:1')."""


def mean_se(values: list[float]) -> tuple[float, float]:
    """(mean, standard error = sample std / sqrt(n)); the error is nan for fewer than 2 values."""
    t = torch.tensor(values, dtype=torch.float64)
    se = float(t.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(t.mean()), se


class WindowStats:
    """Reconstruction sums, firing and routing over the evaluated window, plus per-batch metric values.

    Per expert, a token counts once for each expert its routing chose (e times under top-e routing, never from its
    latent ids): an expert's load is its share of all (token, chosen expert) assignments (the trainer's
    `expert_load`), its MSE that of the tokens that chose it (their whole reconstruction), its L0 the active
    latents of its own per such token.
    """

    def __init__(self, num_latents: int, num_experts: int):
        self.num_experts = num_experts
        self.latents_per_expert = num_latents // num_experts
        self.sums: ReconstructionSums | None = None
        self.expert_sums: list[ReconstructionSums | None] = [None] * num_experts
        self.fired_L = torch.zeros(num_latents, dtype=torch.bool)
        self.batch_metrics: list[dict[str, float]] = []

    def add(self, x_TD: Tensor, x_hat_TD: Tensor, expert_TE: Tensor, active_ids_A: Tensor) -> None:
        """A batch: inputs and reconstructions [T, d], each token's chosen experts [T, e] (distinct), and the
        latent id of every active (token, latent) pair [A] (A = the batch's summed L0)."""
        batch = ReconstructionSums.of_batch(x_TD, x_hat_TD, active_ids_A.numel())
        self.sums = batch if self.sums is None else self.sums + batch
        self.batch_metrics.append(batch.metrics())
        active_ids_A = active_ids_A.cpu()
        self.fired_L[active_ids_A] = True
        active_N = torch.bincount(active_ids_A // self.latents_per_expert, minlength=self.num_experts)
        chose_NT = (expert_TE.cpu()[None, :, :] == torch.arange(self.num_experts)[:, None, None]).any(2)
        for e in range(self.num_experts):
            rows = chose_NT[e].to(x_TD.device)
            if rows.any():
                part = ReconstructionSums.of_batch(x_TD[rows], x_hat_TD[rows], active_N[e])
                self.expert_sums[e] = part if self.expert_sums[e] is None else self.expert_sums[e] + part

    @torch.no_grad()
    def add_batch(self, sae: SAE, rows_TC: Tensor) -> None:
        """Run the SAE (eval mode) on a batch of a source's rows and add it: activations x [T, d] reconstructed,
        or a transcoder's [x | y] [T, d_in + d_out], y reconstructed from x."""
        x_TD, y_TO = sae.split_batch(rows_TC)
        out = sae(x_TD)
        values_RK, ids_RK = out.latent_values_RK, out.latent_indices_RK
        if ids_RK is None:  # dense codes [T, M] (ReLU): column j is latent j
            ids_RK = torch.arange(values_RK.shape[1], device=values_RK.device).expand_as(values_RK)
        if out.routing is None:
            expert_TE = torch.zeros(x_TD.shape[0], 1, dtype=torch.long)
        else:
            expert_TE = out.routing.expert_TE
        self.add(y_TO, out.x_hat_TD, expert_TE, ids_RK[values_RK > 0])

    @property
    def tokens(self) -> int:
        return 0 if self.sums is None else int(self.sums.tokens)

    def report(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(reconstruction section, per-expert rows) of the report."""
        if self.sums is None:
            raise DataUnavailableError("the held-out data gave no activations: pass another --doc-offset or --split")
        section: dict[str, Any] = {"tokens": self.tokens, "batches": len(self.batch_metrics)}
        for key, value in self.sums.metrics().items():
            section[key] = value
            section[f"{key}_se"] = mean_se([m[key] for m in self.batch_metrics])[1]
        section["dead_latents"] = int((~self.fired_L).sum())
        section["dead_window_tokens"] = self.tokens
        dead_N = (~self.fired_L).view(self.num_experts, -1).sum(1)
        tokens_N = [0 if sums is None else int(sums.tokens) for sums in self.expert_sums]
        experts = []
        for e, sums in enumerate(self.expert_sums):
            metrics = sums.metrics() if sums is not None else {"mse": float("nan"), "l0": float("nan")}
            experts.append({"expert": e, "load": tokens_N[e] / sum(tokens_N), "tokens": tokens_N[e],
                            "mse": metrics["mse"], "l0": metrics["l0"], "dead_latents": int(dead_N[e])})
        return section, experts


class HeldOutContexts:
    """The contexts of documents `doc_offset` to the last, read once (no wrap-around into the first documents),
    as right-padded batches."""

    def __init__(self, contexts: TextContexts, doc_offset: int, pad_id: int):
        self.contexts = contexts
        self.doc_offset = doc_offset
        self.pad_id = pad_id
        self.restart()

    def restart(self) -> None:
        self.contexts.seek({"epoch": 0, "doc": self.doc_offset, "ctx": 0})
        self.exhausted = False

    def batch(self, min_tokens: float = math.inf, max_contexts: float = math.inf) -> tuple[Tensor, Tensor] | None:
        """(ids [B, T], attention mask [B, T]) of the next contexts, until they hold >= `min_tokens` tokens or
        number `max_contexts`, or the region ends; None once it has ended."""
        ids: list[Tensor] = []
        tokens = 0
        while not self.exhausted and tokens < min_tokens and len(ids) < max_contexts:
            context = self.contexts.next_context()
            # TextContexts starts a new epoch at the first document: the region has ended.
            if self.contexts.position()["epoch"] > 0:
                self.exhausted = True
                break
            ids.append(torch.tensor(context))
            tokens += len(context)
        if not ids:
            return None
        ids_BT = pad_sequence(ids, batch_first=True, padding_value=self.pad_id)
        return ids_BT, pad_sequence([torch.ones_like(i) for i in ids], batch_first=True)


def load_eval_lm(run: RunConfig, device: str) -> tuple[nn.Module, Any]:
    """The run's language model with its LM head when its checkpoint has one (next-token CE), else the base
    model (embedding measure). Architectures are checked first because AutoModelForCausalLM would also wrap an
    encoder (BERT) in a new, randomly initialised LM head."""
    model, tokenizer = load_lm(run.model, device)
    if any(name.endswith(("LMHeadModel", "ForCausalLM")) for name in model.config.architectures or []):
        model, tokenizer = load_lm(run.model, device, auto_class=AutoModelForCausalLM)
    return model, tokenizer


def heldout_contexts(run: RunConfig, tokenizer: Any, cfg: EvalConfig) -> tuple[HeldOutContexts, dict[str, Any]]:
    """The held-out region and a description of it for the report."""
    data = replace(run.data, dataset=cfg.dataset or run.data.dataset, split=cfg.split or run.data.split,
                   data_files=[cfg.data_files] if cfg.data_files else run.data.data_files,
                   sample_by=cfg.sample_by or run.data.sample_by)
    contexts = TextContexts.from_config(data, tokenizer)
    size = len(contexts.dataset) if hasattr(contexts.dataset, "__len__") else None
    offset = cfg.doc_offset
    if offset is None:
        offset = int(size * (1 - cfg.heldout_frac)) if size else 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    described = {"source": "lm", "dataset": data.dataset, "split": data.split, "doc_offset": offset,
                 "documents": size, **({"data_files": data.data_files} if data.data_files else {})}
    return HeldOutContexts(contexts, offset, pad_id), described


@torch.no_grad()
def splice_batch(sae: SAE, model: nn.Module, sites: list[Site], ids_BT: Tensor, mask_BT: Tensor) -> dict:
    """The splice measures of one batch of contexts, the reconstruction made from this pass's own activations:
    at the SAE's site, or, for a transcoder (`sites` = [input site, target site]), at its target."""
    if sae.transcoder:
        source, target = (site_module(model, site) for site in sites)
        clean_out, _ = clean_pass(model, target, ids_BT, mask_BT, sites[1].side)
        return transcoded_measures(model, source, sites[0].side, target, sites[1].side, ids_BT, mask_BT, clean_out,
                                   lambda x_ND: sae(x_ND).x_hat_TD)
    site = sites[0]
    module = site_module(model, site)
    clean_out, h_BTD = clean_pass(model, module, ids_BT, mask_BT, site.side)
    latents = sae.encode(h_BTD[mask_BT.bool()].float())
    return spliced_measures(model, module, ids_BT, mask_BT, clean_out, sae.decode(latents), site.side)


def evaluate_lm(sae: SAE, model: nn.Module, sites: list[Site], region: HeldOutContexts,
                cfg: EvalConfig) -> tuple[WindowStats, list[dict[str, float]]]:
    """Window statistics and the per-batch splice measures at `sites` (`run_sites`: the SAE's site, or a
    transcoder's input and target sites), both from the start of the held-out region."""
    hooked = HookedLM(model, sites)
    stats = WindowStats(sae.cfg.num_latents, sae.cfg.num_experts)
    region.restart()
    for _ in tqdm(range(cfg.batches), desc="reconstruction", unit="batch"):
        batch = region.batch(min_tokens=cfg.batch_tokens)
        if batch is None:
            break
        stats.add_batch(sae, hooked(*batch).to(cfg.device))
    splice_rows: list[dict[str, float]] = []
    spliced = 0
    region.restart()
    with tqdm(total=cfg.splice_contexts, desc="splice (3 passes)", unit="context") as bar:
        while spliced < cfg.splice_contexts:
            batch = region.batch(max_contexts=min(cfg.splice_batch_contexts, cfg.splice_contexts - spliced))
            if batch is None:
                break
            ids_BT, mask_BT = (t.to(cfg.device) for t in batch)
            splice_rows.append(splice_batch(sae, model, sites, ids_BT, mask_BT))
            spliced += ids_BT.shape[0]
            bar.update(ids_BT.shape[0])
    return stats, splice_rows


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
    for _ in tqdm(range(cfg.batches), desc="reconstruction", unit="batch"):
        stats.add_batch(sae, source.next_batch(cfg.batch_tokens).to(cfg.device))
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


def evaluate(checkpoint_path: str | Path, batches: int = 20, batch_tokens: int = 2048, **options: Any) -> dict:
    """The JSON-ready report of the checkpoint at `checkpoint_path` (a checkpoint folder or a run directory, whose
    latest checkpoint is used); `options` are the other `EvalConfig` fields."""
    cfg = EvalConfig(batches=batches, batch_tokens=batch_tokens, **options)
    folder = resolve_checkpoint(checkpoint_path)
    run, d_model, step = read_checkpoint_config(folder)
    sae = load_sae(folder, cfg.device)
    report: dict[str, Any] = {
        "checkpoint": str(folder), "step": step, "d_model": d_model, "d_out": run.sae.d_out,
        "sae": {"kind": run.sae.kind, "num_latents": run.sae.num_latents, "num_experts": run.sae.num_experts,
                "k": run.sae.k},
        "model": {"name": run.model.name, "layer": run.model.layer, "hookpoint": run.model.hookpoint,
                  "target_hookpoint": run.model.target_hookpoint},
    }
    if run.data.source == "lm" or cfg.dataset is not None:
        model, tokenizer = load_eval_lm(run, cfg.device)
        region, report["data"] = heldout_contexts(run, tokenizer, cfg)
        stats, splice_rows = evaluate_lm(sae, model, run_sites(model, run.model), region, cfg)
        if splice_rows:
            report["splice"] = summarise_splice(splice_rows, splice_measure(model))
    else:
        stats, report["data"] = evaluate_activations(sae, run, cfg)
    report["data"]["batches_requested"] = cfg.batches
    report["reconstruction"], report["experts"] = stats.report()
    return report
