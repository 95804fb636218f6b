"""The SAELens export names the site its SAE read: the TransformerLens hook where one matches (GPT-2's block input and
output, attention and MLP outputs), else the Hugging Face module path, and always the module path and side."""

from __future__ import annotations

import pytest
from transformers import GPT2Config

from sae_dist.config import ModelConfig, RunConfig
from sae_dist.interop.saelens import saelens_metadata


@pytest.fixture(scope="module")
def gpt2_config_dir(tmp_path_factory):
    """A folder holding only a 3-block GPT-2's config.json: all the export reads."""
    folder = tmp_path_factory.mktemp("gpt2-config")
    GPT2Config(n_layer=3, n_embd=64, n_head=4).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("layer", "hookpoint", "hook_name", "hf_hook_point", "hook_layer"), [
    (1, None, "blocks.1.hook_resid_post", "h.1:output", 1),
    (0, "transformer.h.1:input", "blocks.1.hook_resid_pre", "h.1:input", 1),
    (0, "resid_pre.2", "blocks.2.hook_resid_pre", "h.2:input", 2),
    (0, "transformer.h.1.mlp", "blocks.1.hook_mlp_out", "h.1.mlp:output", 1),
    (0, "mlp_out.2", "blocks.2.hook_mlp_out", "h.2.mlp:output", 2),
    (0, "h.0.attn:output", "blocks.0.hook_attn_out", "h.0.attn:output", 0),
    (0, "mlp_in.1", "h.1.mlp:input", "h.1.mlp:input", 1),
    (0, "h.1.mlp.c_fc", "h.1.mlp.c_fc", "h.1.mlp.c_fc:output", 1),
    (0, "ln_f", "ln_f", "ln_f:output", None),
])
def test_gpt2_sites_get_their_transformerlens_hook(gpt2_config_dir, layer, hookpoint, hook_name, hf_hook_point,
                                                   hook_layer):
    run = RunConfig(model=ModelConfig(name="tiny", path=str(gpt2_config_dir), layer=layer, hookpoint=hookpoint))
    metadata = saelens_metadata(run)
    assert (metadata["hook_name"], metadata["hf_hook_point"], metadata["hook_layer"]) == (
        hook_name, hf_hook_point, hook_layer)
    assert metadata["hf_hook_name"] == hf_hook_point, "SAELens's key beside the earlier one"


def test_a_bert_attention_block_has_no_transformerlens_hook():
    """MiniLM's attention block ends in the residual and LayerNorm: not TransformerLens's hook_attn_out."""
    run = RunConfig(model=ModelConfig(name="minilm-bundled", hookpoint="encoder.layer.3.attention"))
    metadata = saelens_metadata(run)
    assert (metadata["hook_name"], metadata["hf_hook_point"]) == ("encoder.layer.3.attention",
                                                                  "encoder.layer.3.attention:output")
    assert saelens_metadata(RunConfig(model=ModelConfig(name="minilm-bundled", layer=3)))["hook_name"] == \
        "blocks.3.hook_resid_post"


def test_a_transcoder_names_its_target_site_too(gpt2_config_dir, tmp_path):
    """The target as `hook_name_out` and `hf_hook_name_out` (SAELens's keys); without the model's
    config.json, `model.target_hookpoint` as written."""
    model = ModelConfig(name="tiny", path=str(gpt2_config_dir), hookpoint="mlp_in.1", target_hookpoint="mlp_out.1")
    metadata = saelens_metadata(RunConfig(model=model))
    assert (metadata["hook_name"], metadata["hf_hook_point"]) == ("h.1.mlp:input", "h.1.mlp:input")
    assert (metadata["hook_name_out"], metadata["hf_hook_name_out"]) == ("blocks.1.hook_mlp_out", "h.1.mlp:output")
    unresolved = ModelConfig(
        name="tiny", path=str(tmp_path / "absent"), hookpoint="mlp_in.1", target_hookpoint="mlp_out.1"
    )
    metadata = saelens_metadata(RunConfig(model=unresolved))
    assert (metadata["hook_name_out"], metadata["hf_hook_name_out"]) == ("mlp_out.1", None)
    sae_model = ModelConfig(name="tiny", path=str(gpt2_config_dir), layer=1)
    assert "hook_name_out" not in saelens_metadata(RunConfig(model=sae_model))
