import importlib.metadata
import json
import re
import time

import numpy as np
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model, LlamaConfig, LlamaModel

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


@pytest.mark.parametrize("lengths", [(9, 9, 9), (9, 4, 9)])
def test_capture_equals_hidden_states_with_or_without_padding(lm, lengths):
    """Contexts of one length go without a mask (and skip the gather), others with one: both give the model's
    hidden states at the tokens, as with the full mask."""
    model, tokenizer = lm
    ids = tokenizer(" ".join(TEXTS), add_special_tokens=False)["input_ids"]
    contexts = [np.array(ids[i : i + n], dtype=np.int32) for i, n in enumerate(lengths)]
    ids_BT = torch.tensor([c.tolist() + [0] * (max(lengths) - len(c)) for c in contexts])
    mask_BT = torch.tensor([[1] * len(c) + [0] * (max(lengths) - len(c)) for c in contexts])
    acts = HookedLM(model, 1).capture(contexts, pad_id=0)
    with torch.inference_mode():
        reference = model(input_ids=ids_BT, attention_mask=mask_BT, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(acts, reference[mask_BT.bool()], rtol=1e-5, atol=1e-5)


def test_compiled_blocks_capture_the_eager_activations(tiny_gpt2_dir):
    """model.compile: the compiled blocks (dynamic shapes: batches of other sizes and lengths, padded or not) give
    the eager activations; blocks after the hooked one are left alone."""
    config = ModelConfig(name="unused", path=str(tiny_gpt2_dir))
    eager_model, tokenizer = load_lm(config)
    compiled_model, _ = load_lm(config)  # compiled in place: not the session-scoped shared model
    eager, compiled = HookedLM(eager_model, 1), HookedLM(compiled_model, 1, compile_blocks=True)
    ids = tokenizer(" ".join(TEXTS), add_special_tokens=False)["input_ids"]
    for lengths in [(9, 9, 9), (9, 4, 9), (12, 12), (7, 3, 5, 2)]:
        contexts = [np.array(ids[i : i + n], dtype=np.int32) for i, n in enumerate(lengths)]
        torch.testing.assert_close(compiled.capture(contexts, pad_id=0), eager.capture(contexts, pad_id=0),
                                   rtol=1e-5, atol=1e-5, msg=lambda m, lengths=lengths: f"{lengths}: {m}")
    blocks = find_blocks(compiled_model)
    assert all(hasattr(b.forward, "_torchdynamo_orig_callable") for b in blocks[:2])
    assert not hasattr(blocks[2].forward, "_torchdynamo_orig_callable")


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
    # The command it suggests exists (huggingface_hub 1.0 replaced `huggingface-cli` by `hf`).
    program = re.search(r"run `(\S+) download ", message).group(1)
    hub_scripts = importlib.metadata.distribution("huggingface_hub").entry_points.select(group="console_scripts")
    assert program in hub_scripts.names, message


def tiny_run(tiny_gpt2_dir, **data) -> RunConfig:
    run = RunConfig()
    run.model.name, run.model.path, run.model.layer = "tiny", str(tiny_gpt2_dir), 1
    run.data.dataset, run.data.ctx_len, run.data.lm_batch_size, run.data.shuffle_buffer = "pydoc-topics", 32, 4, 200
    for key, value in data.items():
        setattr(run.data, key, value)
    return run


def test_lm_source_resume_is_exact(tiny_gpt2_dir):
    run = tiny_run(tiny_gpt2_dir, prefetch=0)
    old = build_activation_source(run, rank=1, world_size=2)
    assert old.d_model == 64
    for _ in range(5):
        old.next_batch(96)
    state = json.loads(json.dumps(old.state_dict()))
    [block] = state["plan"]["blocks"]
    assert block["units"][0][0] % 2 == 1 and 0 < block["offset"]  # rank 1 of 2 reads documents 1, 3, 5, ...
    fresh = build_activation_source(run, rank=1, world_size=2)
    fresh.load_state_dict(state)
    for size in (150, 96, 300):
        batch = old.next_batch(size)
        assert batch.shape == (size, 64) and batch.dtype == torch.float32
        assert torch.equal(batch, fresh.next_batch(size))


def test_prefetched_lm_source_equals_the_plain_one(tiny_gpt2_dir):
    plain = build_activation_source(tiny_run(tiny_gpt2_dir, prefetch=0))
    ahead = build_activation_source(tiny_run(tiny_gpt2_dir, prefetch=3))
    for _ in range(4):
        assert torch.equal(plain.next_batch(128), ahead.next_batch(128))
    assert plain.state_dict() == ahead.state_dict()
    ahead.close()


def test_compiled_lm_in_the_prefetch_thread_serves_the_eager_batches(tiny_gpt2_dir):
    """model.compile with prefetch (the job's default): the blocks compile and run in the producer thread."""
    plain = build_activation_source(tiny_run(tiny_gpt2_dir, prefetch=0))
    compiled_run = tiny_run(tiny_gpt2_dir, prefetch=2)
    compiled_run.model.compile = True
    ahead = build_activation_source(compiled_run)
    for _ in range(3):
        torch.testing.assert_close(ahead.next_batch(128), plain.next_batch(128), rtol=1e-5, atol=1e-5)
    assert plain.state_dict() == ahead.state_dict()
    ahead.close()


def test_pretokenized_lm_source_equals_the_live_one(tiny_gpt2_dir):
    live = build_activation_source(tiny_run(tiny_gpt2_dir, prefetch=0))
    pretokenized = build_activation_source(tiny_run(tiny_gpt2_dir, prefetch=0, pretokenize=True, streaming=False))
    for _ in range(4):
        assert torch.equal(live.next_batch(128), pretokenized.next_batch(128))
    assert live.state_dict() == pretokenized.state_dict()


def test_several_layers_in_one_pass_equal_one_layer_each(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    contexts = [np.asarray(ids, dtype=np.int32) for ids in tokenizer(TEXTS)["input_ids"]]
    both = HookedLM(model, [2, 0]).capture(contexts, pad_id=0)
    alone = [HookedLM(model, layer).capture(contexts, pad_id=0) for layer in (2, 0)]
    assert both.shape == (sum(map(len, contexts)), 128)
    torch.testing.assert_close(both, torch.cat(alone, dim=1), rtol=0, atol=0)
    ids, mask = padded(tokenizer)
    torch.testing.assert_close(HookedLM(model, [2, 0])(ids, mask), both, rtol=0, atol=0)


def test_documents_are_units_across_epochs(minilm):
    from sae_dist.data.lm import LMUnitReader
    from sae_dist.data.text import Documents, cut_documents, load_text_dataset
    from sae_dist.data.tokenize import Tokenization

    model, tokenizer = minilm
    data = RunConfig().data
    data.dataset, data.ctx_len = "pydoc-topics", 32
    documents = Documents(load_text_dataset(data), "text")
    n = documents.per_epoch
    reader = LMUnitReader(HookedLM(model, 0), documents, Tokenization(tokenizer, 32), 8, 0)
    prepared = list(reader.prepare(iter([5, 2, n + 5])))
    expected = cut_documents(tokenizer, [documents.dataset[i]["text"] for i in (5, 2, 5)], 32)
    assert [p.unit for p in prepared] == [5, 2, n + 5]
    for unit, contexts in zip(prepared, expected, strict=True):
        assert unit.rows == sum(map(len, contexts))
        assert all(np.array_equal(a, b) for a, b in zip(unit.payload, contexts, strict=True))


def test_bfloat16_lm_fills_bfloat16_blocks_and_serves_float32(tiny_gpt2_dir):
    run = tiny_run(tiny_gpt2_dir, prefetch=0)
    run.model.dtype = "bfloat16"
    source = build_activation_source(run)
    batch = source.next_batch(50)
    assert source.reader.dtype == torch.bfloat16 and batch.dtype == torch.float32
    assert torch.equal(batch, batch.bfloat16().float())


def test_auto_dtype_is_bfloat16_on_gpu_only():
    from sae_dist.config import resolve_dtype

    assert resolve_dtype("auto", "cpu") == "float32" and resolve_dtype("auto", "cuda") == "bfloat16"
    assert resolve_dtype("float16", "cuda") == "float16"


def test_ranks_read_disjoint_documents(tiny_gpt2_dir):
    run = tiny_run(tiny_gpt2_dir, prefetch=0)
    blocks = []
    for rank in range(3):
        source = build_activation_source(run, rank=rank, world_size=3)
        source.next_batch(1)
        blocks.append(source._current.units)
        assert all(unit % 3 == rank for unit in blocks[-1])
    assert [block[0] for block in blocks] == [0, 1, 2]


def test_loaded_gpt2_runs_one_gelu_kernel_with_the_original_activations(tiny_gpt2_dir):
    """GPT-2's 'gelu_new' (a chain of elementwise operators) becomes torch's tanh GELU in `load_lm`: the model
    computes the activations of the model as transformers builds it."""
    fused, tokenizer = load_lm(ModelConfig(name="unused", path=str(tiny_gpt2_dir)))
    original = GPT2Model.from_pretrained(tiny_gpt2_dir).eval()
    assert original.config.activation_function == "gelu_new"
    assert [type(block.mlp.act) for block in fused.h] == [nn.GELU] * len(fused.h)
    ids, mask = padded(tokenizer)
    with torch.inference_mode():
        expected = original(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got = fused(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for layer_expected, layer_got in zip(expected, got, strict=True):
        torch.testing.assert_close(layer_got, layer_expected, rtol=1e-5, atol=1e-5)
