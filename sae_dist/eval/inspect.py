"""Feature inspection: the activations of chosen latents over a token stream, their top-activating contexts with
the active tokens highlighted (HTML and plain text), and activation histograms.

`collect_activations` runs contexts through the hooked language model and the SAE and keeps, for every context,
its token ids and the activations of the chosen latents at each token. Text is decoded only for the contexts that
are shown (`ActivationRecords.pieces`), since per-token decoding is the slow part. The same records feed the
auto-interpretability protocol (`sae_dist.eval.autointerp`).
"""

from __future__ import annotations

import html
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.ticker import MaxNLocator
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from sae_dist.api import load_sae
from sae_dist.config import RunConfig
from sae_dist.data.cache import read_manifest
from sae_dist.data.lm import HookedLM, load_lm
from sae_dist.data.sites import model_site
from sae_dist.data.text import TextContexts
from sae_dist.eval.plots import new_figure, save_figure
from sae_dist.models.base import Latents
from sae_dist.run_dir import read_checkpoint_config, resolve_checkpoint
from sae_dist.validation import from_dict

OPEN_MARK, CLOSE_MARK = "«", "»"


@dataclass
class ActivationRecords:
    """Activations of L chosen latents over C contexts."""

    latents: list[int]
    """Global latent ids, one per column L."""
    experts: list[int]
    """The expert of each latent."""
    token_ids: list[list[int]]
    """Token ids of each context."""
    acts: list[Tensor]
    """Per context, float32 [T_c, L]: activation f (including the Switch gate) of each latent at each token."""
    detokenize: Callable[[list[int]], list[str]]
    """Token ids -> the text piece of each token (their concatenation is the context's text)."""
    about: dict[str, str] = field(default_factory=dict)
    """Where the records come from, for the page's header: {'checkpoint': ..., 'site': ..., 'text': ...}."""

    def column(self, latent: int) -> int:
        return self.latents.index(latent)

    def max_CL(self) -> Tensor:
        """Maximum activation of each latent in each context, [C, L]."""
        return torch.stack([a.max(0).values for a in self.acts])

    def context_acts(self, context: int, latent: int) -> Tensor:
        """Activations of `latent` at each token of `context`, [T_c]."""
        return self.acts[context][:, self.column(latent)]

    def top_contexts(self, latent: int, n: int) -> list[int]:
        """Indices of the (at most) n contexts with the highest maximum activation, among those where it fires."""
        max_C = self.max_CL()[:, self.column(latent)]
        order = torch.argsort(max_C, descending=True, stable=True)[:n]
        return [int(c) for c in order if max_C[c] > 0]

    def tokens(self) -> int:
        """Tokens scanned, over all contexts."""
        return sum(a.shape[0] for a in self.acts)

    def firing_rate(self, latent: int) -> float:
        """Fraction of the scanned tokens at which `latent` is active."""
        return len(self.token_activations(latent)) / max(self.tokens(), 1)

    def token_activations(self, latent: int) -> Tensor:
        """All positive per-token activations of `latent` (for histograms), [n]."""
        column = torch.cat([a[:, self.column(latent)] for a in self.acts])
        return column[column > 0]

    def pieces(self, context: int) -> list[str]:
        return self.detokenize(self.token_ids[context])


def token_pieces(tokenizer) -> Callable[[list[int]], list[str]]:
    """A detokenizer whose pieces concatenate to the decoded text: piece i = decode(ids[:i+1]) - decode(ids[:i]).

    Decoding prefixes (instead of each id alone) keeps spaces and word-piece joins right for any tokenizer.
    """

    def detokenize(ids: list[int]) -> list[str]:
        texts = [tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
        return [
            after[len(before) :] if after.startswith(before) else tokenizer.decode([token])
            for before, after, token in zip(texts[:-1], texts[1:], ids, strict=True)
        ]

    return detokenize


def latent_activations(latents: Latents, ids_L: Tensor) -> Tensor:
    """Activation of each latent in `ids_L` at each token, [T, L], from sparse latents (values/indices [T, K]).

    Uses a [T, K, L] comparison: keep T * K * L moderate (a language-model batch at a time).
    """
    hit_TKL = latents.indices_TK.unsqueeze(-1) == ids_L
    return (latents.values_TK.float().unsqueeze(-1) * hit_TKL).sum(1)


def sample_latents(num_latents: int, num_experts: int, per_expert: int, seed: int) -> list[int]:
    """`per_expert` random latent ids from each expert's range (all of them where fewer), sorted."""
    rng = random.Random(seed)
    width = num_latents // num_experts
    chosen = []
    for expert in range(num_experts):
        chosen += rng.sample(range(expert * width, (expert + 1) * width), min(per_expert, width))
    return sorted(chosen)


@torch.no_grad()
def collect_activations(
    sae: nn.Module,
    lm: HookedLM,
    contexts: TextContexts,
    latents: Sequence[int],
    num_contexts: int,
    lm_batch_size: int,
    pad_id: int,
    detokenize: Callable[[list[int]], list[str]],
) -> ActivationRecords:
    """Activations of `latents` over the next `num_contexts` contexts of `contexts`."""
    ids_L = torch.tensor(list(latents))
    width = sae.cfg.num_latents // sae.cfg.num_experts
    records = ActivationRecords(list(latents), [i // width for i in latents], [], [], detokenize)
    with tqdm(total=num_contexts, desc="activations", unit="context") as bar:
        while len(records.token_ids) < num_contexts:
            count = min(lm_batch_size, num_contexts - len(records.token_ids))
            batch = [contexts.next_context() for _ in range(count)]
            input_ids_BT = pad_sequence([torch.tensor(ids) for ids in batch], batch_first=True, padding_value=pad_id)
            mask_BT = pad_sequence([torch.ones(len(ids), dtype=torch.long) for ids in batch], batch_first=True)
            x_TD = lm(input_ids_BT, mask_BT)  # non-padding rows, context after context
            acts_TL = latent_activations(sae.encode(x_TD), ids_L)
            records.token_ids += batch
            records.acts += list(acts_TL.split([len(ids) for ids in batch]))
            bar.update(count)
    return records


def mark_text(pieces: Sequence[str], acts_T: Tensor) -> str:
    """The context as text with every active token marked «like this»."""
    return "".join(f"{OPEN_MARK}{p}{CLOSE_MARK}" if a > 0 else p for p, a in zip(pieces, acts_T.tolist(), strict=True))


def _html_context(pieces: Sequence[str], acts_T: Tensor, scale: float) -> str:
    """Tokens as spans whose orange background grows with the activation (relative to `scale`)."""
    spans = []
    for piece, act in zip(pieces, acts_T.tolist(), strict=True):
        text = html.escape(piece)
        if act > 0:
            alpha = min(act / scale, 1.0)
            text = f'<span style="background: rgba(255,120,0,{alpha:.2f})" title="{act:.3g}">{text}</span>'
        spans.append(text)
    return "".join(spans)


MEANING = (
    "A latent's activation is what the decoder multiplies its row by: the encoder's value after TopK, times the "
    "router's probability of the latent's expert for a Switch SAE (0 where it is not among the k selected). "
    "Firing rate: the share of scanned tokens where the latent is active. Each context is one of the latent's "
    "strongest, led by its largest activation; a token's shade grows with its activation, relative to the "
    "latent's strongest context (hover a token for its value)."
)
_STYLE = ("body{font-family:sans-serif;max-width:70em;margin:auto;padding:0 1em} "
          ".ctx{font-family:monospace;white-space:pre-wrap;border-bottom:1px solid #ddd;padding:4px} "
          "table{border-collapse:collapse} td,th{padding:2px 10px;text-align:right} th{border-bottom:1px solid #999} "
          "dt{font-weight:bold;float:left;clear:left;width:8em} dd{margin-left:9em} .meaning{color:#444}")


def _summary(records: ActivationRecords, latent: int) -> str:
    """'fires on 1.23% of tokens (45 of 3,661), max activation 2.5', or 'never active in the 3,661 tokens'."""
    active = len(records.token_activations(latent))
    if not active:
        return f"never active in the {records.tokens():,} scanned tokens"
    top = float(records.max_CL()[:, records.column(latent)].max()) if records.acts else 0.0
    return (f"fires on {records.firing_rate(latent):.2%} of tokens ({active:,} of {records.tokens():,}), "
            f"max activation {top:.3g}")


def render_html(records: ActivationRecords, top_n: int) -> str:
    """One page: a header (checkpoint, site, text, what the numbers mean), an index of the latents with their
    firing rates, then for each latent its top contexts with activation strength as background colour."""
    about = {**records.about, "scanned": f"{len(records.token_ids):,} contexts, {records.tokens():,} tokens"}
    title = f"SAE features: {html.escape(records.about.get('checkpoint', ''))}".rstrip(": ")
    parts = [f"<!doctype html><meta charset='utf-8'><title>{title}</title><style>{_STYLE}</style>",
             "<h1>SAE features</h1><dl>"]
    parts += [f"<dt>{html.escape(key)}</dt><dd>{html.escape(value)}</dd>" for key, value in about.items()]
    parts.append(f"</dl><p class='meaning'>{html.escape(MEANING)}</p>")
    parts.append("<h2>Index</h2><table><tr><th>latent</th><th>expert</th><th>firing rate</th>"
                 "<th>max activation</th></tr>")
    max_CL = records.max_CL() if records.acts else None
    for latent, expert in zip(records.latents, records.experts, strict=True):
        top = float(max_CL[:, records.column(latent)].max()) if max_CL is not None else 0.0
        parts.append(f"<tr><td><a href='#latent-{latent}'>{latent}</a></td><td>{expert}</td>"
                     f"<td>{records.firing_rate(latent):.3%}</td><td>{top:.3g}</td></tr>")
    parts.append("</table>")
    for latent, expert in zip(records.latents, records.experts, strict=True):
        top = records.top_contexts(latent, top_n)
        scale = max((float(records.context_acts(c, latent).max()) for c in top), default=1.0)
        parts.append(f"<h2 id='latent-{latent}'>latent {latent} (expert {expert})</h2><p>{_summary(records, latent)}"
                     + (f"; its {len(top)} strongest contexts:</p>" if top else "</p>"))
        for c in top:
            acts_T = records.context_acts(c, latent)
            parts.append(f"<div class='ctx'><b>{float(acts_T.max()):.3g}</b> "
                         f"{_html_context(records.pieces(c), acts_T, scale)}</div>")
    return "\n".join(parts)


def render_text(records: ActivationRecords, top_n: int) -> str:
    """Plain text: for each latent, its top contexts with the active tokens in «»."""
    lines = [f"{key}: {value}" for key, value in records.about.items()]
    lines += [f"scanned: {len(records.token_ids):,} contexts, {records.tokens():,} tokens", MEANING, ""]
    for latent, expert in zip(records.latents, records.experts, strict=True):
        lines.append(f"== latent {latent} (expert {expert}): {_summary(records, latent)}")
        for c in records.top_contexts(latent, top_n):
            acts_T = records.context_acts(c, latent)
            text = mark_text(records.pieces(c), acts_T).replace("\n", " ")
            lines.append(f"   {float(acts_T.max()):8.3g}  {text}")
    return "\n".join(lines) + "\n"


def plot_histograms(records: ActivationRecords, out: str | Path, bins: int = 40) -> Path:
    """A grid of histograms of each active latent's positive per-token activations, titled with its firing rate;
    latents never active in the scanned text are named in the figure's title instead of drawn empty."""
    active = [latent for latent in records.latents if len(records.token_activations(latent))]
    silent = [latent for latent in records.latents if latent not in active]
    shown = active or records.latents[:1]
    columns = min(4, len(shown))
    rows = -(-len(shown) // columns)
    fig, axes = new_figure(rows, columns, figsize=(3.2 * columns, 2.5 * rows + 0.6))
    for ax, latent in zip(axes.flat, shown, strict=False):
        values = records.token_activations(latent)
        if len(values):
            ax.hist(values.numpy(), bins=bins, range=(0.0, float(values.max())), color="tab:orange")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.text(0.5, 0.5, "never active", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"latent {latent}: fires on {records.firing_rate(latent):.2%}", fontsize="small")
        ax.set_xlabel("activation", fontsize="small")
        ax.set_ylabel("tokens", fontsize="small")
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    title = f"activations where each latent fires ({records.tokens():,} tokens scanned)"
    if silent and active:
        title += f"\nnever active: latents {', '.join(map(str, silent))}"
    fig.suptitle(title, fontsize="medium")
    return save_figure(fig, out)


def write_report(records: ActivationRecords, out_dir: str | Path, top_n: int = 10) -> list[Path]:
    """features.html, features.txt and histograms.png in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "features.html").write_text(render_html(records, top_n), encoding="utf-8")
    (out_dir / "features.txt").write_text(render_text(records, top_n), encoding="utf-8")
    return [out_dir / "features.html", out_dir / "features.txt", plot_histograms(records, out_dir / "histograms.png")]


def text_run_config(run: RunConfig) -> RunConfig:
    """The config whose model and text produced the run's activations: a cache-trained run's is in the manifest."""
    if run.data.source == "cache":
        return from_dict(read_manifest(run.data.cache_dir)["config"])
    return run


def inspect_checkpoint(
    path: str | Path,
    latents: Sequence[int] | None = None,
    per_expert: int = 4,
    num_contexts: int = 1000,
    seed: int = 0,
    device: str = "cpu",
) -> ActivationRecords:
    """Records of `latents` (default: `per_expert` random latents of each expert) of the SAE at `path` over the
    first `num_contexts` contexts of the text its training activations came from."""
    sae = load_sae(path, device)
    folder = resolve_checkpoint(path)
    run, _, step = read_checkpoint_config(folder)
    source = text_run_config(run)
    if latents is None:
        latents = sample_latents(run.sae.num_latents, run.sae.num_experts, per_expert, seed)
    model, tokenizer = load_lm(source.model, device)
    contexts = TextContexts.from_config(source.data, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    records = collect_activations(sae, HookedLM(model, model_site(model, source.model)), contexts, latents, num_contexts,
                                  source.data.lm_batch_size, pad_id, token_pieces(tokenizer))
    records.about = describe_source(folder, step, run, source)
    return records


def describe_source(folder: Path, step: int, run: RunConfig, source: RunConfig) -> dict[str, str]:
    """The feature page's header: which SAE, read where in which model, over which text."""
    sae = run.sae
    files = f" ({', '.join(source.data.data_files)})" if source.data.data_files else ""
    hookpoint = source.model.hookpoint
    where = f"output of block {source.model.layer}" if hookpoint is None else f"model.hookpoint={hookpoint}"
    return {
        "checkpoint": f"{folder} (step {step:,})",
        "SAE": f"{sae.kind}, M={sae.num_latents:,} latents, N={sae.num_experts} experts, k={sae.k}",
        "site": f"{where} of {source.model.path or source.model.name}",
        "text": f"{source.data.dataset}{files}, split {source.data.split}, contexts of {source.data.ctx_len} tokens",
    }
