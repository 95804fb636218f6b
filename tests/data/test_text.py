import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from sae_dist.config import ConfigError, DataConfig
from sae_dist.data import DataUnavailableError, TextContexts
from sae_dist.data.builder_files import check_first_records
from sae_dist.data.text import Documents, load_text_dataset, stream_reading


@pytest.fixture
def tokenizer(minilm):
    return minilm[1]


def pydoc(**overrides) -> DataConfig:
    return DataConfig(dataset="pydoc-topics", **overrides)


def test_pydoc_topics_dataset():
    ds = load_text_dataset(pydoc())
    assert ds.column_names == ["text"] and len(ds) > 50
    assert sum(len(text) for text in ds["text"]) > 100_000


def test_documents_cut_into_contexts(tokenizer):
    stream = TextContexts.from_config(pydoc(ctx_len=32), tokenizer)
    first_doc = []
    while stream.position()["doc"] == 0:
        first_doc.append(stream.next_context())
    first_doc.pop()  # the first context of document 1
    assert len(first_doc) > 2
    assert all(len(ctx) == 32 for ctx in first_doc[:-1]) and 2 < len(first_doc[-1]) <= 32
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert all(ctx[0] == cls and ctx[-1] == sep for ctx in first_doc)
    joined = [token for ctx in first_doc for token in ctx[1:-1]]
    text = load_text_dataset(pydoc())[0]["text"]
    assert joined == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_ranks_get_disjoint_documents(tokenizer):
    everything = load_text_dataset(pydoc())["text"]
    shards = [TextContexts.from_config(pydoc(), tokenizer, rank, 3).dataset["text"] for rank in range(3)]
    assert sum(len(shard) for shard in shards) == len(everything)
    assert sorted(t for shard in shards for t in shard) == sorted(everything)
    assert all(len(set(a) & set(b)) == 0 for i, a in enumerate(shards) for b in shards[i + 1 :])


@pytest.mark.parametrize("streaming", [False, True])
def test_epochs_and_seek(tokenizer, tmp_path, streaming):
    files = []
    for i in range(2):
        files.append(str(tmp_path / f"part{i}.txt"))
        (tmp_path / f"part{i}.txt").write_text("".join(f"line {i}.{j} " * (j + 1) + "\n" for j in range(3)))
    data = DataConfig(dataset="text", data_files=files, streaming=streaming, ctx_len=8)
    stream = TextContexts.from_config(data, tokenizer)
    one_epoch = []
    while stream.position()["epoch"] == 0:
        one_epoch.append(stream.next_context())
    one_epoch.pop()  # the first context of epoch 1
    assert [stream.next_context() for _ in range(len(one_epoch) - 1)] == one_epoch[1:]
    assert stream.position()["epoch"] == 1

    for taken in (0, 4, len(one_epoch) + 3):
        old = TextContexts.from_config(data, tokenizer)
        for _ in range(taken):
            old.next_context()
        fresh = TextContexts.from_config(data, tokenizer)
        fresh.seek(json.loads(json.dumps(old.position())))
        assert [fresh.next_context() for _ in range(5)] == [old.next_context() for _ in range(5)]


def test_builder_without_files_is_a_config_error():
    with pytest.raises(ConfigError, match="data.data_files"):
        load_text_dataset(DataConfig(dataset="json"))


def test_missing_local_file_is_one_line(tmp_path):
    with pytest.raises(DataUnavailableError) as info:
        load_text_dataset(DataConfig(dataset="text", data_files=[str(tmp_path / "absent.txt")]))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["Skylion007/openwebtext", "sae-dist-tests/no-such-dataset"])
def test_unreachable_hub_dataset_fails_fast(name, hub_reachable):
    if name == "Skylion007/openwebtext" and hub_reachable:
        pytest.skip("the Hub is reachable: the dataset would stream")
    start = time.perf_counter()
    with pytest.raises(DataUnavailableError) as info:
        load_text_dataset(DataConfig(dataset=name))
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "\n" not in message and name in message and "data.data_files" in message


def test_python_docs_corpus_is_english_documentation_in_a_fixed_order():
    from sae_dist.data.python_docs import python_documents

    docs = python_documents()
    assert load_text_dataset(DataConfig(dataset="python-docs"))["text"] == docs  # the cached corpus, same order
    assert len(docs) > 1000 and sum(map(len, docs)) > 1_000_000
    assert all(len(doc) >= 200 for doc in docs[100:])
    assert any("Return" in doc for doc in docs)


def text_files(tmp_path, count: int = 2) -> list[str]:
    files = []
    for i in range(count):
        files.append(str(tmp_path / f"part{i}.txt"))
        (tmp_path / f"part{i}.txt").write_text("".join(f"line {i}.{j} " * (j + 1) + "\n" for j in range(3)))
    return files


def test_documents_by_global_index_wrap_around_epochs(tmp_path):
    from sae_dist.data.text import Documents

    files = text_files(tmp_path)
    mapped = Documents(load_text_dataset(DataConfig(dataset="text", data_files=files, streaming=False)), "text")
    streamed = Documents(load_text_dataset(DataConfig(dataset="text", data_files=files, streaming=True)), "text")
    n = mapped.per_epoch
    assert n == 6 and streamed.per_epoch is None
    everything = mapped.texts(list(range(n)))
    wanted = [4, 5, n + 1, 3 * n + 2, 2, n + 2, 0]  # forwards across epochs, then back: the stream restarts
    assert mapped.texts(wanted) == streamed.texts(wanted) == [everything[g % n] for g in wanted]
    assert streamed.per_epoch == n


def test_empty_dataset_is_one_line():
    from datasets import Dataset, IterableDataset

    from sae_dist.data.text import Documents

    def nothing():
        yield from ()

    for dataset in (Dataset.from_dict({"text": []}), IterableDataset.from_generator(nothing)):
        with pytest.raises(DataUnavailableError, match="holds no documents"):
            Documents(dataset, "text").texts([0])


def test_batched_cutting_equals_one_document_at_a_time(tokenizer):
    from sae_dist.data.text import cut_documents

    texts = load_text_dataset(pydoc())["text"][:20] + ["", "short"]
    together = cut_documents(tokenizer, texts, 32)
    for text, contexts in zip(texts, together, strict=True):
        alone = tokenizer(text, max_length=32, truncation=True, return_overflowing_tokens=True)["input_ids"]
        assert [c.tolist() for c in contexts] == [ids for ids in alone if ids]


@pytest.mark.parametrize("way", ["workers", "pretokenized"])
def test_tokenizer_workers_and_pretokenizing_give_the_same_contexts_in_order(tokenizer, way):
    """Units from several epochs (200 > the documents of one), repeated and out of order."""
    from sae_dist.data.text import Documents
    from sae_dist.data.tokenize import PretokenizedContexts, Tokenization

    documents = Documents(load_text_dataset(pydoc()), "text")
    assert documents.per_epoch < 200
    units = [3, 1, 200, 7, 7, 0] + list(range(40, 180))
    inline = list(Tokenization(tokenizer, 32).contexts(documents, iter(units)))
    other = (Tokenization(tokenizer, 32, workers=2) if way == "workers"
             else PretokenizedContexts(documents.dataset, tokenizer, 32, "text", num_proc=2))
    try:
        contexts = list(other.contexts(documents, iter(units)))
    finally:
        other.close()
    assert [u for u, _ in contexts] == [u for u, _ in inline] == units
    for (_, a), (_, b) in zip(inline, contexts, strict=True):
        assert [c.tolist() for c in a] == [c.tolist() for c in b] and all(c.dtype == np.int32 for c in b)


def test_text_files_as_whole_documents(tmp_path):
    files = text_files(tmp_path)
    data = DataConfig(dataset="text", data_files=files, sample_by="document", streaming=False)
    by_file = load_text_dataset(data)["text"]
    assert by_file == [Path(f).read_text() for f in files]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_file_that_is_not_utf8_reads_with_replacement_characters(tmp_path, streaming):
    """site-packages/**/*.py (the README's corpus) holds a Latin-1 file: the text builder stopped with a
    UnicodeDecodeError traceback."""
    good, latin1 = tmp_path / "good.py", tmp_path / "latin1.py"
    good.write_text("def f():\n    return 1\n")
    latin1.write_bytes("# coding: latin-1\nname = 'caf\xe9'\n".encode("latin-1"))
    data = DataConfig(dataset="text", data_files=[str(tmp_path / "*.py")], sample_by="document", streaming=streaming)
    texts = sorted(row["text"] for row in load_text_dataset(data))
    assert texts == sorted([good.read_text(), "# coding: latin-1\nname = 'caf\ufffd'\n"])


VARIED_TEXTS = [
    "",
    "   \n\t ",
    "short",
    "naïve café, Ærøskøbing, 東京, Привет мир, emoji 🙂🚀 and a zero\u200bwidth space",
    "[CLS] literal special tokens [SEP] inside [PAD] a text [UNK]",
    "word " * 700,  # several full contexts and a short last one
    "x" * 5000,  # one long word
]


def byte_level_tokenizer(texts: list[str], frame: str | None):
    """A GPT-2-like byte-level BPE tokenizer trained on `texts`: no special tokens (frame None), or a BOS
    prefix ('bos') as Llama's has."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.post_processor = (processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
                              if frame == "bos" else processors.ByteLevel(trim_offsets=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")


@pytest.mark.parametrize("kind", ["bert", "bert-left-truncation", "byte-level", "byte-level-bos"])
@pytest.mark.parametrize("ctx_len", [4, 32, 128])
def test_context_cutter_equals_the_tokenizers_own_cut(tokenizer, kind, ctx_len):
    """The fast path (Rust ids without specials, cut and framed by NumPy) gives the contexts of the tokenizer's
    truncation with overflow, text by text, on empty, unicode, long and special-token texts; for BERT also the
    hand cut of `tokenizer(text)["input_ids"]` into [CLS] + runs of ctx_len - 2 + [SEP]."""
    import copy

    from sae_dist.data.text import ContextCutter

    texts = VARIED_TEXTS + load_text_dataset(pydoc())["text"][:30]
    if kind.startswith("byte-level"):
        tok = byte_level_tokenizer(texts, "bos" if kind.endswith("bos") else None)
    else:
        tok = copy.deepcopy(tokenizer)
        tok.truncation_side = "left" if kind.endswith("left-truncation") else "right"
    cut_texts = ContextCutter(tok, ctx_len)
    assert cut_texts.fast == (kind != "bert-left-truncation")
    contexts = cut_texts(texts)
    for text, cut in zip(texts, contexts, strict=True):
        alone = tok(text, max_length=ctx_len, truncation=True, return_overflowing_tokens=True)["input_ids"]
        assert [c.tolist() for c in cut] == [ids for ids in alone if ids]
        assert all(c.dtype == np.int32 for c in cut)
        if kind == "bert":
            ids = tok(text, add_special_tokens=False)["input_ids"]
            runs = [ids[i : i + ctx_len - 2] for i in range(0, len(ids), ctx_len - 2)] or [[]]
            assert [c.tolist() for c in cut] == [[tok.cls_token_id, *run, tok.sep_token_id] for run in runs]
    assert sum(len(cut) > 1 for cut in contexts) >= 3  # long texts were cut into several contexts


def test_context_cutter_without_room_for_tokens_is_a_config_error(tokenizer):
    from sae_dist.data.text import ContextCutter

    with pytest.raises(ConfigError, match="data.ctx_len=2 leaves no room"):
        ContextCutter(tokenizer, 2)


@pytest.mark.parametrize(("cores", "local_ranks", "device", "expected"), [
    (16, None, "cuda", 8),  # the target needs 8 workers; a 16-core node has them to spare
    (96, "8", "cuda", 8),
    (64, "8", "cuda", 6),  # 8 cores per rank, 2 kept for the trainer
    (16, "8", "cuda", 0),
    (3, None, "cuda", 1),
    (16, None, "cpu", 0),  # the LM needs the CPU's cores
])
def test_tokenizer_workers_rule(monkeypatch, cores, local_ranks, device, expected):
    import torch

    from sae_dist.config import RunConfig
    from sae_dist.data import pretokenize_processes, tokenizer_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    if local_ranks is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
    assert tokenizer_workers(RunConfig(data=pydoc()), torch.device(device)) == expected
    assert tokenizer_workers(RunConfig(data=pydoc(tokenizer_workers=3)), torch.device(device)) == 3
    assert pretokenize_processes() == cores // int(local_ranks or 1)


def test_a_streamed_file_damaged_past_its_first_block_is_named_when_read(tmp_path, tokenizer):
    """A JSON file damaged past the builder's first 10 MB block passes the first-record check and streams until the
    damage; reading it there (the training's documents, or an evaluation's contexts) formerly ended in the builder's
    ~120-line traceback and exit status 1."""
    good, damaged = tmp_path / "d0.jsonl", tmp_path / "d1.jsonl"
    good.write_text('{"text": "fine"}\n' * 3)
    record = json.dumps({"text": "x" * 100}) + "\n"
    sound = (11 << 20) // len(record)
    damaged.write_text(record * sound + '{"text": "broken\n' + record)
    data = DataConfig(dataset="json", data_files=[str(good), str(damaged)], streaming=True)
    check_first_records(data)
    expected = re.escape(f"data.data_files: {damaged} cannot be read by the 'json' builder (JSON parse error: "
                         "Invalid encoding in string. in row ") + r"\d+" + re.escape(
                             "); its records before that were read; repair or remove the file")

    documents = Documents(load_text_dataset(data), data.text_column, stream_reading(data))
    assert documents.texts([0, 3]) == ["fine", "x" * 100]
    with pytest.raises(DataUnavailableError) as info:
        documents.texts([3 + sound])
    assert re.fullmatch(expected, str(info.value)), str(info.value)
    contexts = TextContexts.from_config(data, tokenizer)
    contexts.seek({"epoch": 0, "doc": sound, "ctx": 0})
    with pytest.raises(DataUnavailableError) as info:
        for _ in range(10):
            contexts.next_context()
    assert re.fullmatch(expected, str(info.value)), str(info.value)
