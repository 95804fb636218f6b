import pytest
import torch

from sae_dist.metrics import ReconstructionSums


def test_metrics_match_hand_computed_values():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 4.0]])
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 6.0], [5.0, 6.0]])
    m = ReconstructionSums.of_batch(x, x_hat, active=torch.tensor(7)).metrics()
    # residuals: (0,1), (1,0), (0,-2): squared sums 1, 1, 4 -> mean 2
    assert m["mse"] == pytest.approx(2.0)
    var_x = x.var(0, unbiased=False).sum()  # 8/3 + 8/3
    var_r = (x - x_hat).var(0, unbiased=False).sum()  # 2/9 + 42/9
    assert m["fvu"] == pytest.approx(float(var_r / var_x))
    assert m["l0"] == pytest.approx(7 / 3)


def test_sums_add_across_batches_like_one_batch():
    g = torch.Generator().manual_seed(0)
    x, x_hat = torch.randn(50, 4, generator=g) + 3, torch.randn(50, 4, generator=g)
    whole = ReconstructionSums.of_batch(x, x_hat, 10).metrics()
    parts = ReconstructionSums.of_batch(x[:20], x_hat[:20], 4) + ReconstructionSums.of_batch(x[20:], x_hat[20:], 6)
    for key, value in parts.metrics().items():
        assert value == pytest.approx(whole[key], rel=1e-10)
