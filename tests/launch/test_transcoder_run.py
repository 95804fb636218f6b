"""The documented transcoder command: block 3's MLP of the bundled MiniLM, its input and output read in one pass,
trains, checkpoints, and loads as a transcoder whose decode(encode(x), x) is its forward; a sweep of the
transcoders of two blocks from one pass trains, and each member loads."""

from __future__ import annotations

import torch

from sae_dist.api import load_sae
from sae_dist.config import RunConfig
from sae_dist.data import build_activation_source
from sae_dist.run_dir import read_checkpoint_config, resolve_checkpoint

MLP_OF_BLOCK_3 = ["model=minilm_bundled", "data=python_docs", "model.hookpoint=mlp_in.3",
                  "model.target_hookpoint=mlp_out.3", "sae.d_out=384"]
SMALL = ["sae.num_latents=256", "sae.num_experts=4", "sae.k=8", "trainer.batch_size=64", "data.shuffle_buffer=512",
         "trainer.progress=false", "trainer.tensorboard=false"]


def test_a_transcoder_of_minilms_mlp_trains_and_loads(command, tmp_path):
    outcome = command("train.py", *MLP_OF_BLOCK_3, *SMALL, "trainer.steps=3", f"trainer.out_dir={tmp_path / 'run'}")
    assert outcome.status == 0, outcome.err[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "step_00000003").is_dir()
    sae = load_sae(tmp_path / "run")
    assert (sae.d_model, sae.d_out, sae.transcoder) == (384, 384, True)
    run = RunConfig()
    run.model.name, run.model.hookpoint, run.model.target_hookpoint = "minilm-bundled", "mlp_in.3", "mlp_out.3"
    run.sae.d_out, run.data.dataset, run.data.shuffle_buffer, run.data.prefetch = 384, "python-docs", 512, 0
    source = build_activation_source(run)
    x, _ = sae.split_batch(source.next_batch(64))
    source.close()
    with torch.no_grad():
        torch.testing.assert_close(sae.decode(sae.encode(x), x), sae(x).x_hat_TD)


def test_a_sweep_of_the_transcoders_of_two_blocks_trains_and_each_loads(command, tmp_path):
    outcome = command("train.py", "model=minilm_bundled", "data=python_docs", "data.ctx_len=32", "sae.d_out=384",
                      "sweep=[{model: {hookpoint: 'mlp_in.[23]', target_hookpoint: 'mlp_out.[23]'}}]", *SMALL,
                      "trainer.steps=2", "trainer.checkpoint_every=2", f"trainer.out_dir={tmp_path / 'sweep'}")
    assert outcome.status == 0, outcome.err[-2000:]
    names = sorted(folder.name for folder in (tmp_path / "sweep").iterdir())
    assert names == [f"switch_M256_N4_k8_mlp_in.{i}_to_mlp_out.{i}" for i in (2, 3)]
    for block, name in zip((2, 3), names, strict=True):
        sae = load_sae(tmp_path / "sweep" / name)
        assert (sae.d_model, sae.d_out, sae.transcoder) == (384, 384, True)
        saved, _, _ = read_checkpoint_config(resolve_checkpoint(tmp_path / "sweep" / name))
        assert (saved.model.hookpoint, saved.model.target_hookpoint) == (f"mlp_in.{block}", f"mlp_out.{block}")
