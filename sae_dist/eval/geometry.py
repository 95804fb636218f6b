"""Feature geometry (docs/math.md section 6): how the decoder directions of a Switch SAE relate within and across
experts.

For every latent i (a unit decoder row w_i, expert e_i) and every expert b, let S[i, b] be the largest cosine
between w_i and a row of expert b, excluding w_i itself. From S:
- the within-expert nearest-neighbour cosine of i is S[i, e_i], the across-expert one max_{b != e_i} S[i, b];
- i is a duplicate when its across-expert nearest neighbour has cosine > 0.9 (the paper's threshold): the same
  feature learnt by two experts, capacity the Switch SAE spends twice;
- the expert-by-expert similarity matrix is the mean of S[i, b] over the latents i of expert a, entry [a, b].
S is computed in chunks of rows against all M rows, so memory is chunk x M, never M x M (M = 65536 fits in a
few hundred MB at the default chunk).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae_dist.eval.plots import new_figure, save_figure

DUPLICATE_COSINE = 0.9
_CHUNK_ELEMENTS = 2**24
"""Cosines held at once: 64 MB of float32."""


def expert_rows(sae: nn.Module, which: str = "decoder") -> Tensor:
    """Encoder or decoder rows of a Switch/TopK SAE [N, M_e, d] or a ReLU SAE [1, M, d], float32, unit norm."""
    if which not in ("decoder", "encoder"):
        raise ValueError(f"which={which!r}; allowed: decoder, encoder")
    owner = sae.experts if hasattr(sae, "experts") else sae
    rows = (owner.w_dec if which == "decoder" else owner.w_enc).detach().float()
    rows_NMD = rows if rows.dim() == 3 else rows.unsqueeze(0)
    return rows_NMD / rows_NMD.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def max_cosine_per_expert(rows_NMD: Tensor, chunk: int | None = None) -> Tensor:
    """S [M, N]: for each row (flattened expert-major) the largest cosine with a row of each expert, itself
    excluded. Rows must be unit norm. `chunk` rows are compared with all M at a time (default: 2^24 / M)."""
    n, m_e, d = rows_NMD.shape
    all_MD = rows_NMD.reshape(n * m_e, d)
    m = all_MD.shape[0]
    chunk = chunk or max(1, _CHUNK_ELEMENTS // m)
    out_MN = torch.empty(m, n, device=rows_NMD.device)
    for start in tqdm(range(0, m, chunk), desc="nearest neighbours", unit="chunk", disable=m <= chunk):
        stop = min(start + chunk, m)
        cos_CM = all_MD[start:stop] @ all_MD.T
        own = torch.arange(start, stop, device=cos_CM.device)
        cos_CM[own - start, own] = -float("inf")
        out_MN[start:stop] = cos_CM.view(stop - start, n, m_e).amax(-1)
    return out_MN


@dataclass
class Geometry:
    """Nearest-neighbour statistics of one set of rows (M latents, N experts)."""

    within_nn_M: Tensor
    """Cosine of each latent's nearest neighbour in its own expert [M] (-inf for a 1-latent expert)."""
    across_nn_M: Tensor | None
    """Cosine of each latent's nearest neighbour in another expert [M]; None with one expert."""
    similarity_NN: Tensor
    """[a, b]: mean over latents of expert a of their largest cosine with a latent of expert b."""

    @property
    def duplicate_M(self) -> Tensor | None:
        """Bool [M]: the nearest neighbour in another expert has cosine > 0.9."""
        return None if self.across_nn_M is None else self.across_nn_M > DUPLICATE_COSINE

    def summary(self) -> dict:
        """JSON-ready numbers: means and quantiles of both nearest-neighbour cosines, duplicates, the matrix."""

        def stats(values: Tensor) -> dict[str, float]:
            q = torch.quantile(values.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
            return {"mean": float(values.mean()), "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2])}

        n = self.similarity_NN.shape[0]
        out = {
            "num_latents": int(self.within_nn_M.numel()),
            "num_experts": n,
            "within_expert_nn_cosine": stats(self.within_nn_M),
            "across_expert_nn_cosine": None,
            "duplicate_threshold": DUPLICATE_COSINE,
            "duplicate_fraction": None,
            "duplicates_per_expert": None,
            "expert_similarity": self.similarity_NN.tolist(),
        }
        if self.across_nn_M is not None:
            duplicate_M = self.duplicate_M
            out["across_expert_nn_cosine"] = stats(self.across_nn_M)
            out["duplicate_fraction"] = float(duplicate_M.float().mean())
            out["duplicates_per_expert"] = duplicate_M.view(n, -1).sum(1).tolist()
        return out


def geometry(rows_NMD: Tensor, chunk: int | None = None) -> Geometry:
    """Within/across-expert nearest neighbours and the expert similarity matrix of unit rows [N, M_e, d]."""
    n, m_e, _ = rows_NMD.shape
    s_MN = max_cosine_per_expert(rows_NMD, chunk)
    expert_M = torch.arange(n, device=s_MN.device).repeat_interleave(m_e)
    own_M1 = expert_M[:, None]
    within_M = s_MN.gather(1, own_M1).squeeze(1)
    across_M = None
    if n > 1:
        across_M = s_MN.scatter(1, own_M1, -float("inf")).amax(1)
    similarity_NN = s_MN.view(n, m_e, n).mean(1)
    return Geometry(within_M.cpu(), None if across_M is None else across_M.cpu(), similarity_NN.cpu())


def tsne_2d(rows_NMD: Tensor, max_points: int = 4000, seed: int = 0) -> tuple[Tensor, Tensor] | None:
    """A 2-D t-SNE of up to `max_points` rows sampled evenly over experts: (points [P, 2], expert [P]);
    None when scikit-learn is not installed (t-SNE is optional)."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        return None
    n, m_e, _ = rows_NMD.shape
    per_expert = max(1, min(m_e, max_points // n))
    g = torch.Generator().manual_seed(seed)
    picks = [torch.randperm(m_e, generator=g)[:per_expert] for _ in range(n)]
    rows_PD = torch.cat([rows_NMD[e, p].cpu() for e, p in enumerate(picks)])
    expert_P = torch.arange(n).repeat_interleave(per_expert)
    perplexity = min(30.0, max(2.0, (rows_PD.shape[0] - 1) / 3))
    points = TSNE(2, perplexity=perplexity, init="pca", random_state=seed, metric="cosine").fit_transform(
        rows_PD.numpy()
    )
    return torch.from_numpy(points), expert_P


def plot_tsne(embeddings: dict[str, tuple[Tensor, Tensor]], out: str | Path, title: str = "") -> Path:
    """One scatter panel per named embedding (e.g. 'encoder', 'decoder'), points coloured by expert."""
    fig, axes = new_figure(1, len(embeddings), figsize=(5.0 * len(embeddings), 4.6))
    for ax, (name, (points_P2, expert_P)) in zip(axes[0], embeddings.items(), strict=True):
        scatter = ax.scatter(points_P2[:, 0], points_P2[:, 1], c=expert_P, cmap="tab20", s=3, linewidths=0)
        ax.set_title(f"{name} rows (t-SNE)", fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("t-SNE dimension 1 (no units)")
        ax.set_ylabel("t-SNE dimension 2")
        if int(expert_P.max()) < 20:
            ax.legend(*scatter.legend_elements(), title="expert", fontsize="x-small", markerscale=0.8)
        else:
            fig.colorbar(scatter, ax=ax, label="expert id")
    if title:
        fig.suptitle(title, fontsize="medium")
    return save_figure(fig, out)
