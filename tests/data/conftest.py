"""Shared fixtures of the data tests: the bundled MiniLM and a tiny random GPT-2, both local (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from transformers import GPT2Config, GPT2Model, PreTrainedModel, PreTrainedTokenizerBase

from sae_dist.config import ModelConfig
from sae_dist.data.lm import load_lm


@pytest.fixture(scope="session")
def minilm() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_lm(ModelConfig(name="minilm-bundled"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(minilm, tmp_path_factory) -> Path:
    """A folder holding a randomly initialised 3-block GPT-2 (d=64) with the MiniLM tokenizer."""
    _, tokenizer = minilm
    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_embd=64, n_head=4, n_positions=128, vocab_size=tokenizer.vocab_size)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2Model(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_lm(ModelConfig(name="unused", path=str(tiny_gpt2_dir)))


@pytest.fixture(scope="session")
def hub_reachable() -> bool:
    """Whether the Hugging Face Hub answers (then a real Hub name would download instead of failing)."""
    try:
        HfApi().model_info("openai-community/gpt2", timeout=5)
    except Exception:
        return False
    return True
