"""Loss recovered (docs/math.md section 6): run the language model with the activation at its site replaced and compare.

The site is a module and a side (`sae_dist/data/sites.py`): a block's output, or any module's output (replaced by
a forward hook) or input (replaced by a forward pre-hook before the module runs). Per batch of right-padded
contexts, three forward passes: clean (which also captures the site's activation h), with h replaced at the
non-padding positions by the SAE reconstruction, and with h zero-ablated. What is compared
depends on the model:
- a model with an LM head: next-token cross-entropy (nats per predicted token; a position t counts when t and
  t + 1 are both real tokens) of the three passes, fraction recovered FR = (CE_rec - CE_zero) / (CE_clean -
  CE_zero), delta CE = CE_rec - CE_clean, and KL(clean || spliced) of the next-token distributions;
- a model without one (MiniLM, a sentence encoder): its own output, the mean-pooled last hidden state over
  the real tokens: cosine similarity of the spliced to the clean embedding, per context, and FR = (cos_rec -
  cos_zero) / (1 - cos_zero).
Every measure is a mean over the batch's positions (or contexts); evaluation averages batches for error bars.

A transcoder (SPEC section 9) replaces its target site's activation y with its output computed from the input
site's activation x of the same pass (a hook keeps x, a later hook at the target replaces y); zero ablation zeroes y.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_dist.config import ConfigError
from sae_dist.data.sites import splice

MEASURE_CE = "next_token_ce"
MEASURE_EMBEDDING = "embedding_cosine"


def splice_measure(model: nn.Module) -> str:
    """Which measure `model` supports: MEASURE_CE with an LM head, else MEASURE_EMBEDDING."""
    return MEASURE_CE if model.get_output_embeddings() is not None else MEASURE_EMBEDDING


def _forward(model: nn.Module, module: nn.Module, ids_BT: Tensor, mask_BT: Tensor, fn: Callable[[Tensor], Tensor],
             side: str = "output"):
    """Logits [B, T, V] (LM head) or last hidden state [B, T, d] with `module`'s activation on `side` replaced by
    fn(h)."""
    with splice(module, fn, side), torch.inference_mode():
        out = model(input_ids=ids_BT, attention_mask=mask_BT)
    return (out.logits if splice_measure(model) == MEASURE_CE else out.last_hidden_state).float()


def clean_pass(model: nn.Module, module: nn.Module, ids_BT: Tensor, mask_BT: Tensor,
               side: str = "output") -> tuple[Tensor, Tensor]:
    """(model output of the clean pass, the activation h [B, T, d] on `module`'s `side` that it captured)."""
    captured: list[Tensor] = []

    def keep(h_BTD: Tensor) -> Tensor:
        captured.append(h_BTD)
        return h_BTD

    return _forward(model, module, ids_BT, mask_BT, keep, side), captured[0]


def _next_token_ce(logits_BTV: Tensor, ids_BT: Tensor, valid_BT: Tensor) -> Tensor:
    return F.cross_entropy(logits_BTV[:, :-1][valid_BT], ids_BT[:, 1:][valid_BT])


def _kl(clean_logp_PV: Tensor, logits_PV: Tensor) -> Tensor:
    """Mean over positions of KL(clean || other), nats."""
    return F.kl_div(F.log_softmax(logits_PV, -1), clean_logp_PV, log_target=True, reduction="batchmean")


def ce_measures(clean_BTV: Tensor, rec_BTV: Tensor, zero_BTV: Tensor, ids_BT: Tensor, mask_BT: Tensor) -> dict:
    """Cross-entropies, FR, delta CE and KLs of one batch from the three passes' logits (see module doc)."""
    valid_BT = mask_BT[:, :-1].bool() & mask_BT[:, 1:].bool()
    ce = {name: float(_next_token_ce(logits, ids_BT, valid_BT))
          for name, logits in (("clean", clean_BTV), ("rec", rec_BTV), ("zero", zero_BTV))}
    clean_logp_PV = F.log_softmax(clean_BTV[:, :-1][valid_BT], -1)
    return {
        "ce_clean": ce["clean"],
        "ce_reconstructed": ce["rec"],
        "ce_zero_ablated": ce["zero"],
        "delta_ce": ce["rec"] - ce["clean"],
        "fraction_recovered": (ce["rec"] - ce["zero"]) / (ce["clean"] - ce["zero"]),
        "kl_reconstructed": float(_kl(clean_logp_PV, rec_BTV[:, :-1][valid_BT])),
        "kl_zero_ablated": float(_kl(clean_logp_PV, zero_BTV[:, :-1][valid_BT])),
    }


def _mean_pool(h_BTD: Tensor, mask_BT: Tensor) -> Tensor:
    weights_BT1 = mask_BT.unsqueeze(-1).float()
    return (h_BTD * weights_BT1).sum(1) / weights_BT1.sum(1).clamp_min(1)


def embedding_measures(clean_BTD: Tensor, rec_BTD: Tensor, zero_BTD: Tensor, mask_BT: Tensor) -> dict:
    """Mean cosine of the spliced to the clean pooled embedding over the contexts, and FR (see module doc)."""
    clean_BD = _mean_pool(clean_BTD, mask_BT)
    cos_rec = float(F.cosine_similarity(_mean_pool(rec_BTD, mask_BT), clean_BD, dim=-1).mean())
    cos_zero = float(F.cosine_similarity(_mean_pool(zero_BTD, mask_BT), clean_BD, dim=-1).mean())
    return {
        "cosine_reconstructed": cos_rec,
        "cosine_zero_ablated": cos_zero,
        "fraction_recovered": (cos_rec - cos_zero) / (1 - cos_zero),
    }


def spliced_measures(
    model: nn.Module, module: nn.Module, ids_BT: Tensor, mask_BT: Tensor, clean_out: Tensor, x_hat_TD: Tensor,
    side: str = "output",
) -> dict[str, float]:
    """The batch's measures with h replaced by `x_hat_TD` (one row per non-padding position, row-major) and
    zero-ablated, against `clean_out` from `clean_pass`."""
    real_BT = mask_BT.bool()

    def reconstruct(h_BTD: Tensor) -> Tensor:
        h_BTD = h_BTD.clone()
        h_BTD[real_BT] = x_hat_TD.to(h_BTD.dtype)
        return h_BTD

    rec_out = _forward(model, module, ids_BT, mask_BT, reconstruct, side)
    return _measures(model, module, ids_BT, mask_BT, clean_out, rec_out, side)


def transcoded_measures(
    model: nn.Module, source: nn.Module, source_side: str, target: nn.Module, target_side: str, ids_BT: Tensor,
    mask_BT: Tensor, clean_out: Tensor, transcode: Callable[[Tensor], Tensor],
) -> dict[str, float]:
    """The batch's measures with a transcoder's target, `target`'s activation y on `target_side`, replaced by
    `transcode(x)` ([N, d_in] -> [N, d_out], one row per non-padding position) of the input x that `source` has on
    `source_side` in the same pass, and with y zero-ablated, against `clean_out` from `clean_pass`. x must come
    before y in the forward (an MLP's input and output); a target that runs first is a one-line ConfigError."""
    real_BT = mask_BT.bool()
    x_ND: list[Tensor] = []

    def keep(x_BTD: Tensor) -> None:
        x_ND.append(x_BTD[real_BT].float())

    def transcoded(y_BTD: Tensor) -> Tensor:
        if not x_ND:
            raise ConfigError("model.target_hookpoint runs before model.hookpoint in the forward: a transcoder's "
                              "output cannot replace a site that its input comes after")
        y_BTD = y_BTD.clone()
        y_BTD[real_BT] = transcode(x_ND.pop()).to(y_BTD.dtype)
        return y_BTD

    with splice(source, keep, source_side):
        rec_out = _forward(model, target, ids_BT, mask_BT, transcoded, target_side)
    return _measures(model, target, ids_BT, mask_BT, clean_out, rec_out, target_side)


def _measures(model: nn.Module, module: nn.Module, ids_BT: Tensor, mask_BT: Tensor, clean_out: Tensor,
              rec_out: Tensor, side: str) -> dict[str, float]:
    """The measures of the clean, reconstructed and (run here) zero-ablated passes at `module`'s `side`."""
    zero_out = _forward(model, module, ids_BT, mask_BT, torch.zeros_like, side)
    if splice_measure(model) == MEASURE_CE:
        return ce_measures(clean_out, rec_out, zero_out, ids_BT, mask_BT)
    return embedding_measures(clean_out, rec_out, zero_out, mask_BT)
