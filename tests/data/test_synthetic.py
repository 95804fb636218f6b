import json

import torch

from sae_dist.config import RunConfig
from sae_dist.data import PrefetchingSource, SyntheticSource, build_activation_source, feature_recovery


def make(rank: int = 0, seed: int = 0, noise: float = 0.01) -> SyntheticSource:
    return SyntheticSource(d_model=128, num_features=64, active=6, noise=noise, seed=seed, rank=rank)


def test_batches_shape_dtype_and_ground_truth():
    source = make()
    x = source.next_batch(256)
    assert x.shape == (256, 128) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert source.true_features.shape == (64, 128)
    torch.testing.assert_close(source.true_features.norm(dim=1), torch.ones(64))
    # The offset is a large, fixed component that the mean of the data reveals.
    assert source.offset.norm() > 2
    assert torch.nn.functional.cosine_similarity(x.mean(0), source.offset, dim=0) > 0.5


def test_samples_are_sparse_nonnegative_combinations():
    source = make(noise=0.0)
    x = source.next_batch(2000) - source.offset
    # 64 random directions in R^128 are independent, so least squares recovers the exact coefficients.
    coef = torch.linalg.lstsq(source.true_features.T.double(), x.T.double()).solution.T
    assert coef.min() > -1e-6
    active = (coef > 0.25).sum(dim=1).float()
    assert abs(active.mean().item() - 6) < 0.5


def test_deterministic_per_seed_and_rank():
    a, b = make(), make()
    assert torch.equal(a.next_batch(64), b.next_batch(64))
    assert torch.equal(make(seed=1).true_features, make(seed=1, rank=3).true_features)
    assert not torch.equal(make(rank=1).next_batch(64), make(rank=0).next_batch(64))
    assert not torch.equal(make(seed=1).true_features, make(seed=0).true_features)


def test_resume_is_exact():
    old = make()
    for _ in range(3):
        old.next_batch(100)
    state = json.loads(json.dumps(old.state_dict()))
    fresh = make()
    fresh.load_state_dict(state)
    for _ in range(3):
        assert torch.equal(old.next_batch(100), fresh.next_batch(100))


def test_feature_recovery():
    true = make().true_features
    shuffled_with_extras = torch.cat([true[torch.randperm(64)] * 3.0, torch.randn(40, 128)])
    assert abs(feature_recovery(shuffled_with_extras, true) - 1.0) < 1e-5
    assert feature_recovery(torch.randn(64, 128), true) < 0.5
    half = feature_recovery(true[:32], true)
    assert 0.5 < half < 0.8


def test_build_dispatch():
    run = RunConfig()
    run.data.source, run.data.d_model, run.data.synthetic_features, run.data.synthetic_active = "synthetic", 32, 16, 2
    source = build_activation_source(run, rank=1, world_size=2)
    assert isinstance(source, PrefetchingSource) and source.d_model == 32  # data.prefetch batches ahead
    assert isinstance(source.source, SyntheticSource) and source.source.rank == 1
    source.close()
    run.data.prefetch = 0
    assert isinstance(build_activation_source(run), SyntheticSource)
