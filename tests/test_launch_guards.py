"""The checks `launch/train.py` makes before loading: a continued sweep member whose folder was trained on
activations of another width is refused in one line, glob members included (each expanded to its site's folder)."""

from __future__ import annotations

import pytest

from sae_dist.config import DataConfig, ModelConfig, RunConfig, SAEConfig, TrainerConfig
from sae_dist.launch_guards import check_resumed_width
from sae_dist.models import build_sae
from sae_dist.run_dir import CHECKPOINTS_DIR, LATEST_FILE, CheckpointError
from sae_dist.train.preflight import expanded_sweep_members
from sae_dist.validation import validate
from tests.model_files import write_model_files


def test_a_glob_members_folder_trained_on_another_width_is_refused(tmp_path):
    run = RunConfig(sae=SAEConfig(kind="topk", num_latents=64, num_experts=1, k=4),
                    model=ModelConfig(name="minilm-bundled"),
                    data=DataConfig(source="lm", dataset="pydoc-topics", streaming=False, ctx_len=32),
                    trainer=TrainerConfig(out_dir=str(tmp_path / "sweep"), progress=False),
                    sweep=[{"model": {"hookpoint": "mlp_out.[2-3]"}}])
    validate(run)
    check_resumed_width(run, None)  # no member has a checkpoint yet
    members = expanded_sweep_members(run)
    assert [m.model.hookpoint for m in members] == ["mlp_out.2", "mlp_out.3"]
    member = members[1]
    folder = tmp_path / "sweep" / member.name / CHECKPOINTS_DIR / "step_00000001"
    folder.mkdir(parents=True)
    write_model_files(folder, build_sae(member.sae, 32, seed=0), member, 32, step=1)
    (folder.parent / LATEST_FILE).write_text(folder.name + "\n")
    with pytest.raises(CheckpointError, match=f"{folder} was trained on activations of d_model=32, but .* gives "
                                              "d_model=384"):
        check_resumed_width(run, None)
