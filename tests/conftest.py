"""Shared fixtures: small run configurations on the synthetic source."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sae_dist.config import DataConfig, RunConfig, SAEConfig, TrainerConfig, validate  # noqa: E402


def small_run(tmp_path, kind="switch", **trainer_overrides) -> RunConfig:
    """A Switch (or TopK / ReLU) SAE on 64-d synthetic activations, a few seconds of CPU."""
    experts = 4 if kind == "switch" else 1
    trainer = dict(batch_size=256, steps=30, log_every=5, checkpoint_every=10, out_dir=str(tmp_path / "run"),
                   progress=False, tensorboard=False, lr=5e-3)
    trainer.update(trainer_overrides)
    run = RunConfig(
        sae=SAEConfig(kind=kind, num_latents=256, num_experts=experts, k=8, dead_tokens=2000,
                      lb_alpha=0.1),
        data=DataConfig(source="synthetic", d_model=64, synthetic_features=128, synthetic_active=4,
                        synthetic_noise=0.01),
        trainer=TrainerConfig(**trainer),
    )
    validate(run)
    return run


@pytest.fixture
def make_run(tmp_path):
    return lambda **kw: small_run(tmp_path, **kw)
