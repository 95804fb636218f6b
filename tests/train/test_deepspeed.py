"""The DeepSpeed engine (trainer.engine=deepspeed) on CPU with gloo: one 2-rank job runs every check against the
torch engine on the same seed, layout and data (see deepspeed_workers); each check is its own test here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))  # the spawn harness and EP helpers

from deepspeed_workers import LAYOUTS, TRAINING, assert_states_match, two_ranks  # noqa: E402
from spawn_harness import spawn_checks  # noqa: E402

from sae_dist import load_sae  # noqa: E402
from sae_dist.config import ConfigError, TrainerConfig, register_configs  # noqa: E402
from sae_dist.run_dir import latest_checkpoint  # noqa: E402
from sae_dist.train import checkpoint as ckpt  # noqa: E402
from sae_dist.train.run import train_from_config  # noqa: E402
from sae_dist.validation import to_run_config, validate  # noqa: E402

register_configs()

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data=synthetic", "data.d_model=32", "sae.num_latents=128", "sae.num_experts=4", "sae.k=4", "trainer.lr=5e-3",
        "trainer.batch_size=64", "trainer.steps=4", "trainer.checkpoint_every=2", "trainer.log_every=1",
        "trainer.progress=false", "trainer.tensorboard=false"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deepspeed")
    return folder, spawn_checks(two_ranks, 2, folder, "two")


def test_decoder_rows_split_between_partitions_are_projected_exactly(job):
    job[1].require("projection_split_rows")


@pytest.mark.parametrize("ep_size,stage", LAYOUTS)
def test_one_step_equals_torch_engine(job, ep_size, stage):
    """Forward and loss bit for bit; the global norm, every reduced and projected gradient, and the weights after
    the clipped Adam step equal the torch engine's, for experts sharded (P = 2) or replicated (P = 1), ZeRO 1 and 2."""
    job[1].require(f"step_P{ep_size}_z{stage}")


def test_bfloat16_autocast_step_equals_torch_engine(job):
    """trainer.dtype=bfloat16 (what a GPU run uses) through DeepSpeed: the torch engine's autocast, same results."""
    job[1].require("step_bfloat16")


@pytest.mark.parametrize("ep_size,stage", LAYOUTS[:3])
def test_training_equals_torch_engine(job, ep_size, stage):
    """Six steps with two checkpoints: weights, Adam moments, dead-latent counters and logged metrics."""
    job[1].require(f"training_P{ep_size}_z{stage}")


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_dense_saes_equal_torch_engine(job, kind):
    """Data parallelism: TopK (experts replicated, P = 1) and ReLU (no expert parameters, no MoE groups)."""
    job[1].require(f"step_{kind}")
    job[1].require(f"training_{kind}")


def test_resume_is_exact(job):
    job[1].require("resume_exact")


def test_checkpoints_resume_across_engines(job):
    job[1].require("resume_across_engines")


def test_sweep_equals_torch_engine_sweep(job):
    """Several SAEs from one stream on the DeepSpeed engine: an engine per member in one process works."""
    job[1].require("sweep")


def test_checkpoint_loads_through_public_api(job):
    job[1].require("training_P2_z2")
    folder = job[0] / "train_switch_P2_z2_deepspeed"
    sae = load_sae(folder)
    saved = ckpt.read_global_state(latest_checkpoint(folder), "model.")
    assert sae.state_dict().keys() == saved.keys()
    for name, tensor in saved.items():
        assert (sae.state_dict()[name] == tensor).all(), name


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("engine", "megatron", "trainer.engine='megatron' is unknown; allowed: torch, deepspeed"),
        ("zero_stage", 3, "trainer.zero_stage=3 is unknown; allowed: 1, 2"),
    ],
)
def test_bad_engine_settings_fail_in_one_line(make_run, field, value, message):
    run = make_run()
    setattr(run.trainer, field, value)
    with pytest.raises(ConfigError, match=message):
        validate(run)
    assert TrainerConfig().engine == "torch"


def test_missing_deepspeed_is_one_line(monkeypatch):
    from sae_dist.train.deepspeed_engine import import_deepspeed

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what an environment without the extra sees
    with pytest.raises(ConfigError, match=r"trainer.engine=deepspeed needs DeepSpeed: pip install -e '.\[deepspeed\]'"):
        import_deepspeed("cpu")


def test_one_process_from_the_command_line_equals_torch_engine(tmp_path):
    """`python launch/train.py trainer.engine=deepspeed` without torchrun (a process group of one, ZeRO 2) against
    the torch engine in this process on the same configuration."""
    overrides = [*TINY, "trainer.zero_stage=2"]
    command = [sys.executable, "launch/train.py", *overrides, "trainer.engine=deepspeed",
               f"trainer.out_dir={tmp_path / 'deepspeed'}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        run = to_run_config(compose(config_name="config", overrides=[*overrides, f"trainer.out_dir={tmp_path / 'torch'}"]))
    train_from_config(run)
    torch_state, deepspeed_state = (ckpt.read_global_state(latest_checkpoint(tmp_path / engine))
                                    for engine in ("torch", "deepspeed"))
    assert_states_match(deepspeed_state, torch_state, TRAINING)
