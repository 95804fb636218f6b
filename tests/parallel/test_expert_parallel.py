"""Expert parallelism on CPU with gloo: one 4-rank and one 2-rank job run every check (see ep_workers), and each
check is reported here as its own test. Tolerances: models (float32 router, gate and losses): rtol 1e-5, atol 1e-6;
float32 training for 6 steps: rtol 1e-5, atol 1e-6; resuming on the same layout: bit for bit."""

from __future__ import annotations

import pytest
import torch
from ep_helpers import GlobalBatchSource, copy_checkpoint, tiny_run
from ep_workers import EXACT, TRAINING, assert_matches_checkpoint, assert_restored_exactly, four_ranks, two_ranks
from spawn_harness import spawn_checks

from sae_dist import load_sae
from sae_dist.run_dir import MODEL_FILE, RANKS_DIR, checkpoint_name, latest_checkpoint
from sae_dist.train import checkpoint as ckpt
from sae_dist.train.trainer import Trainer


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Both jobs share a folder: the 2-rank job resumes the 4-rank job's checkpoint."""
    folder = tmp_path_factory.mktemp("ep")
    four = spawn_checks(four_ranks, 4, folder, "four")
    two = spawn_checks(two_ranks, 2, folder, "two")
    return {"folder": folder, 4: four, 2: two}


@pytest.mark.parametrize("ep_size", [4, 2, 1])
def test_dispatch_with_identity_experts_returns_input_and_gradient(jobs, ep_size):
    jobs[4].require(f"dispatch_identity_P{ep_size}")


def test_dispatch_identity_on_two_ranks(jobs):
    jobs[2].require("dispatch_identity_P2")


@pytest.mark.parametrize("ep_size", [4, 2, 1])
def test_dispatch_capacity_keeps_highest_scores_and_drops_the_rest(jobs, ep_size):
    jobs[4].require(f"dispatch_capacity_P{ep_size}")


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("ep_size", [4, 2, 1])
def test_overlapped_dispatch_equals_plain(jobs, ep_size, capacity_factor):
    """Chunked all-to-all overlapping transfer and expert compute: outputs, per-row results, gradients, drops."""
    jobs[4].require(f"overlapped_dispatch_P{ep_size}_cf{capacity_factor}")


@pytest.mark.parametrize("ep_size", [4, 2, 1])
def test_overlapped_model_equals_single_device(jobs, ep_size):
    jobs[4].require(f"model_overlapped_P{ep_size}")


def test_overlapped_training_equals_single_device_trainer(jobs):
    jobs[4].require("training_overlapped_P2")


@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 4), (4, 2), (4, 1)])
def test_dropless_model_equals_single_device_forward_and_gradients(jobs, world, ep_size):
    """Forward, aux reconstruction, loss terms, LB loss and its gradient, every gradient, clip, fired latents."""
    jobs[world].require(f"model_P{ep_size}")


def test_capacity_drops_reconstruct_as_b_pre_and_are_logged(jobs):
    jobs[4].require("model_capacity")


@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 4), (4, 2), (4, 1)])
def test_training_steps_equal_single_device_trainer(jobs, world, ep_size):
    jobs[world].require(f"training_P{ep_size}")


def test_recipe_options_under_expert_parallelism_equal_single_device(jobs):
    """Dead counts of routed tokens (all-reduced over the ranks), AuxK over them, the lr of the expert width."""
    jobs[2].require("training_recipe_P2")


@pytest.mark.parametrize("world", [2, 4])
def test_keep_alive_options_under_expert_parallelism_equal_single_device(jobs, world):
    """AuxK scaled as Gao et al. and dead-latent resampling, on 2 ranks (P = 2) and on 4 (P = 2: two replicas of every
    expert, which must draw alike): weights, dead counters and the number resampled equal one device's."""
    jobs[world].require("training_keep_alive_P2")


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_dense_sae_under_torchrun_is_data_parallel(jobs, kind):
    jobs[2].require(f"data_parallel_{kind}")


def test_batchtopk_under_expert_parallelism_equals_single_device_trainer(jobs):
    """Each expert gets all its tokens of the global batch (P = W): the same selection, weights and threshold."""
    jobs[2].require("training_batchtopk_P2")


@pytest.mark.parametrize("check", ["model_P2_e2", "model_overlapped_P2_e2", "training_P2_e2"])
def test_top2_routing_under_expert_parallelism_equals_single_device(jobs, check):
    """Each token's two experts on (usually) different ranks: forward, losses, every gradient, encode, training."""
    jobs[2].require(check)


@pytest.mark.parametrize("world,check", [(2, "model_P2_union"), (4, "model_P4_union"), (4, "model_P2_union"),
                                         (4, "model_P1_union"), (2, "training_P2_union"), (4, "training_P2_union"),
                                         (4, "model_capacity_union")])
def test_union_topk_under_expert_parallelism_equals_single_device(jobs, world, check):
    """Union TopK with each token's candidates from two ranks: forward, losses, every gradient, encode, training (4
    ranks: 2 data-parallel replicas at P = 2), and capacity drops left out of the union."""
    jobs[world].require(check)


@pytest.mark.parametrize("world,ep_size,label", [
    (2, 2, "transcoder_skip_sparse"), *((4, p, label) for p in (4, 2, 1)
                                        for label in ("transcoder_skip_sparse", "transcoder_gemm")),
])
def test_transcoder_model_equals_single_device_and_the_oracle(jobs, world, ep_size, label):
    """x travels, y stays with its token: forward, AuxK against y, losses, every gradient (W_skip, b_in, b_out
    included), the global norm, encode and decode equal one device's, which equals the dense oracle; sparse and GEMM
    expert compute."""
    jobs[world].require(f"model_P{ep_size}_{label}")


@pytest.mark.parametrize("check", ["model_overlapped_P2_transcoder", "model_P4_transcoder_e2"])
def test_transcoder_under_chunked_dispatch_and_top2_routing_equals_single_device(jobs, check):
    jobs[4].require(check)


@pytest.mark.parametrize("world,check", [
    (4, "training_keep_alive_P2_transcoder"), (4, "training_P4_transcoder_gemm"), (2, "training_P2_transcoder"),
    *((2, f"{name}_skip={skip}") for skip in (True, False) for name in (
        "training_batchtopk_P2_transcoder", "data_parallel_topk_transcoder", "data_parallel_relu_transcoder")),
])
def test_transcoder_training_equals_single_device_trainer(jobs, world, check):
    """Six steps of transcoders: Switch with the skip, AuxK and resampling (2 replicas of each expert on 4 ranks), a
    GEMM-compute Switch transcoder on 4 ranks, BatchTopK experts and data-parallel TopK and ReLU, with and without the
    skip: weights, dead counters and resampled counts equal one device's."""
    jobs[world].require(check)


@pytest.mark.parametrize("label", ["sae", "transcoder"])
def test_normalisation_estimated_over_ranks_equals_single_device(jobs, label):
    """s_x (and a transcoder's s_y) from every rank's batches, reduced: equal on every rank to one device's estimate
    over the global batches, and the training that follows equal to one device's."""
    jobs[2].require(f"training_P2_normalised_{label}")


def test_batchtopk_replicas_hold_one_threshold(jobs):
    jobs[2].require("batchtopk_replicas_P1")


def test_resume_on_same_layout_is_exact(jobs):
    jobs[4].require("checkpoint_save")
    jobs[4].require("resume_same_layout")


@pytest.mark.parametrize("ep_size", [2, 1])
def test_resume_four_rank_checkpoint_on_two_ranks(jobs, ep_size):
    jobs[2].require(f"resume_from_4_P{ep_size}")


def test_resume_four_rank_checkpoint_in_one_process(jobs, tmp_path):
    jobs[4].require("checkpoint_save")
    unbroken = jobs["folder"] / "ep_run"
    folder = copy_checkpoint(unbroken, 3, tmp_path / "resume_1")
    run = tiny_run(tmp_path / "resume_1", resume=True)
    trainer = Trainer(run, GlobalBatchSource(run))
    assert trainer.maybe_resume() and trainer.step == 3
    assert_restored_exactly(trainer, folder)
    trainer.train()
    assert_matches_checkpoint(trainer, unbroken / "checkpoints" / checkpoint_name(6), TRAINING)


def test_load_sae_reads_the_expert_parallel_run(jobs):
    jobs[4].require("checkpoint_save")
    run_dir = jobs["folder"] / "ep_run"
    folder = latest_checkpoint(run_dir)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [MODEL_FILE]
    assert sorted(p.name for p in (folder / RANKS_DIR).iterdir()) == [f"rank_{r:05d}.pt" for r in range(4)]
    sae = load_sae(run_dir)
    assert sae.experts.w_enc.shape == (4, 32, 32)
    saved = ckpt.read_global_state(folder, "model.")
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], **EXACT)
    x_TD = GlobalBatchSource(tiny_run(run_dir)).next_batch(16)
    latents = sae.encode(x_TD)
    torch.testing.assert_close(sae.decode(latents), sae(x_TD).x_hat_TD, rtol=1e-5, atol=1e-5)
