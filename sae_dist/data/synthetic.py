"""Synthetic activations with known ground-truth features, to check that an SAE recovers what it should.

F unit-norm directions in R^d are drawn once from `seed` (identical on every rank). Each activation is
    x = offset + sum_{i in S} m_i f_i + noise,
where S holds about `active` features (2 * active uniform draws, each kept with probability 1/2, so |S| is
Binomial(2 * active, 1/2) with mean `active`), magnitudes m_i ~ U(0.5, 1.5), noise ~ N(0, noise^2) per
dimension, and `offset` is a fixed vector of norm sqrt(active), about the norm of the sparse part, so that an
SAE without a learned pre-bias (geometric median) is penalised. Batch i is a function of (seed, rank, i,
batch size, device type) alone, so the state is one counter. Batches are generated on the training device (a
GPU's generator draws other numbers than the CPU's; the directions are drawn on the CPU, so they agree).

Transcoder pairs (`d_out`, docs/math.md section 9): each row is [x | y] with x as above and the target
    y = A x + sum_{i in S} m_i^2 g_i,
a linear map A [d_out, d] (entries N(0, 1/d)) plus a nonlinear sparse part: each feature i writes its squared
magnitude along its own unit direction g_i in R^{d_out}. A skip connection can learn A; latents that detect f_i in x
can write m_i^2 g_i. A, g and the target add no draw to a batch's stream: x is the SAE's x, bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_dist.config import DataConfig
from sae_dist.data.source import ActivationSource, derive_seed

# Feature rows per chunk in `feature_recovery`: bounds the [chunk, M] cosine matrix.
_RECOVERY_CHUNK = 256


class SyntheticSource(ActivationSource):
    """Sparse non-negative combinations of fixed random directions, plus an offset and Gaussian noise."""

    def __init__(
        self,
        d_model: int,
        num_features: int,
        active: int,
        noise: float,
        seed: int = 0,
        rank: int = 0,
        device: str | torch.device = "cpu",
        d_out: int | None = None,
    ) -> None:
        self.d_in = d_model
        self.d_target = d_out or 0
        self.d_model = d_model + self.d_target
        self.device = torch.device(device)
        self.active = active
        self.noise = noise
        self.seed = seed
        self.rank = rank
        gen = torch.Generator().manual_seed(seed)
        self.true_features = F.normalize(torch.randn(num_features, d_model, generator=gen), dim=-1).to(self.device)
        """Ground-truth unit directions, [F, d]."""
        self.offset = (F.normalize(torch.randn(d_model, generator=gen), dim=0) * active**0.5).to(self.device)
        """The mean offset added to every activation, [d]."""
        self.target_map = self.target_features = None
        if d_out is not None:
            self.target_map = (torch.randn(d_out, d_model, generator=gen) * d_model**-0.5).to(self.device)
            """A [d_out, d]: the linear part of the target."""
            self.target_features = F.normalize(torch.randn(num_features, d_out, generator=gen), dim=-1).to(self.device)
            """g [F, d_out]: where each feature writes its squared magnitude in the target."""
        self._batch = 0

    @classmethod
    def from_config(
        cls, data: DataConfig, seed: int, rank: int = 0, device: str | torch.device = "cpu", d_out: int | None = None
    ) -> SyntheticSource:
        """The source of `data`; `d_out` (sae.d_out): [x | y] rows for a transcoder."""
        return cls(
            data.d_model, data.synthetic_features, data.synthetic_active, data.synthetic_noise, seed, rank, device,
            d_out,
        )

    def next_batch(self, batch_size: int) -> Tensor:
        gen = torch.Generator(self.device).manual_seed(derive_seed(self.seed, self.rank, self._batch))
        self._batch += 1
        num_features = self.true_features.shape[0]
        slots = 2 * self.active
        on = {"generator": gen, "device": self.device}
        ids_BS = torch.randint(num_features, (batch_size, slots), **on)
        keep_BS = torch.rand(batch_size, slots, **on) < 0.5
        magnitude_BS = torch.rand(batch_size, slots, **on) + 0.5
        # A sparse decode: only the ~2*active drawn rows are read per sample, never a dense [B, F] matmul.
        x_BD = F.embedding_bag(ids_BS, self.true_features, per_sample_weights=magnitude_BS * keep_BS, mode="sum")
        x_BD = x_BD + self.offset + self.noise * torch.randn(batch_size, self.d_in, **on)
        if self.target_map is None:
            return x_BD
        sparse_BO = F.embedding_bag(ids_BS, self.target_features, per_sample_weights=magnitude_BS.pow(2) * keep_BS,
                                    mode="sum")
        return torch.cat([x_BD, x_BD @ self.target_map.T + sparse_BO], dim=1)

    def state_dict(self) -> dict:
        return {"batch": self._batch}

    def load_state_dict(self, state: dict) -> None:
        self._batch = int(state["batch"])


def feature_recovery(decoder_rows_MD: Tensor, true_features_FD: Tensor) -> float:
    """Mean over the true features of the largest cosine similarity to any learned decoder row (1 = all found)."""
    dec_MD = F.normalize(decoder_rows_MD.detach().float().cpu(), dim=-1)
    true_FD = F.normalize(true_features_FD.detach().float().cpu(), dim=-1)
    best = [(chunk_CD @ dec_MD.T).max(dim=1).values for chunk_CD in true_FD.split(_RECOVERY_CHUNK)]
    return torch.cat(best).mean().item()
