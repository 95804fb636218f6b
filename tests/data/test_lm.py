import json
import time

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaModel

from sae_dist.config import ConfigError, ModelConfig, RunConfig
from sae_dist.data import DataUnavailableError, HookedLM, build_activation_source, find_blocks, load_lm, splice

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hi.", "Sparse autoencoders find features in activations."]


@pytest.fixture(params=["minilm", "tiny_gpt2"])
def lm(request):
    return request.getfixturevalue(request.param)


def padded(tokenizer, texts=TEXTS):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()
    return enc["input_ids"], enc["attention_mask"]


def test_bundled_minilm_loads(minilm):
    model, _ = minilm
    assert model.config.hidden_size == 384 and len(find_blocks(model)) == 6 and not model.training


@pytest.mark.parametrize("layer", [0, 1])
def test_hook_equals_hidden_states_at_non_padding_positions(lm, layer):
    model, tokenizer = lm
    ids, mask = padded(tokenizer)
    acts = HookedLM(model, layer)(ids, mask)
    with torch.inference_mode():
        reference = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer + 1]
    assert acts.shape == (mask.sum(), model.config.hidden_size) and acts.dtype == torch.float32
    torch.testing.assert_close(acts, reference[mask.bool()], rtol=0, atol=0)


def test_padding_dropped_and_harmless(lm):
    model, tokenizer = lm
    ids, mask = padded(tokenizer)
    hooked = HookedLM(model, 1)
    together = hooked(ids, mask)
    encodings = [tokenizer(text, return_tensors="pt") for text in TEXTS]
    alone = [hooked(enc["input_ids"], enc["attention_mask"]) for enc in encodings]
    assert len(together) == mask.sum() < mask.numel()
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-4)


def test_later_blocks_never_run(lm):
    model, tokenizer = lm
    blocks = find_blocks(model)
    calls = []
    handles = [b.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    try:
        HookedLM(model, 1)(*padded(tokenizer))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [0, 1]


def test_layer_out_of_range(tiny_gpt2):
    with pytest.raises(ConfigError, match=r"model.layer=3 is out of range: the model has 3 blocks"):
        HookedLM(tiny_gpt2[0], 3)


def test_find_blocks_common_architectures():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    assert find_blocks(gpt2) is gpt2.transformer.h
    llama = LlamaModel(
        LlamaConfig(
            num_hidden_layers=2,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=50,
        )
    )
    assert find_blocks(llama) is llama.layers

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = GPT2Config(n_layer=3)
            self.heads = nn.ModuleList([nn.Linear(2, 2)])
            self.stack = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    custom = Custom()
    assert find_blocks(custom) is custom.stack


def test_splice_replaces_block_output(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    ids, mask = padded(tokenizer)
    blocks = find_blocks(model)
    seen = []

    def record_input(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])

    handle = blocks[2].register_forward_pre_hook(record_input, with_kwargs=True)
    with torch.inference_mode():
        clean = model(input_ids=ids, attention_mask=mask).last_hidden_state
        with splice(blocks[1], lambda h: h):
            same = model(input_ids=ids, attention_mask=mask).last_hidden_state
        with splice(blocks[1], torch.zeros_like):
            ablated = model(input_ids=ids, attention_mask=mask).last_hidden_state
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    handle.remove()
    assert torch.equal(clean, same) and torch.equal(clean, after)
    assert torch.equal(seen[2], torch.zeros_like(clean)) and not torch.allclose(ablated, clean)


def test_model_path_overrides_name(tiny_gpt2_dir):
    model, _ = load_lm(ModelConfig(name="openai-community/gpt2", path=str(tiny_gpt2_dir)))
    assert model.config.n_embd == 64


@pytest.mark.parametrize("name", ["openai-community/gpt2", "sae-dist-tests/no-such-model"])
def test_unavailable_hub_model_fails_fast(name, hub_reachable):
    if name == "openai-community/gpt2" and hub_reachable:
        pytest.skip("the Hub is reachable: gpt2 would download")
    start = time.perf_counter()
    with pytest.raises(DataUnavailableError) as info:
        load_lm(ModelConfig(name=name))
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "\n" not in message and name in message and "model.path=" in message


def test_lm_source_resume_is_exact(tiny_gpt2_dir):
    run = RunConfig()
    run.model.name, run.model.path, run.model.layer = "tiny", str(tiny_gpt2_dir), 1
    run.data.dataset, run.data.ctx_len, run.data.lm_batch_size, run.data.shuffle_buffer = "pydoc-topics", 32, 4, 200
    old = build_activation_source(run, rank=1, world_size=2)
    assert old.d_model == 64
    for _ in range(5):
        old.next_batch(96)
    state = json.loads(json.dumps(old.state_dict()))
    assert state["block_index"] == 2 and state["block_start"]["epoch"] == 0
    fresh = build_activation_source(run, rank=1, world_size=2)
    fresh.load_state_dict(state)
    for size in (150, 96, 300):
        batch = old.next_batch(size)
        assert batch.shape == (size, 64) and batch.dtype == torch.float32
        assert torch.equal(batch, fresh.next_batch(size))
