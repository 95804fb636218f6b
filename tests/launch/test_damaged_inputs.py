"""Faults injected into the commands' inputs and surroundings: a folder in use, a multirun with one bad job, damaged
files, a file-size limit, an offline machine. Each ends in one line naming the file or value and exit status 2,
before anything is loaded where that can be known.

Before: a second trainer on a folder in use resumed from the first's checkpoint and both exited 0; `-m sae.k=8,0`
trained k = 8 to its end before refusing k = 0; a cache shard whose header is garbage ended in `MemoryError` after
63 lines; a cache folder replaced by one of another width in `Size mismatch ... model.b_pre` after 73 lines; a
non-UTF-8 SHA256SUMS in `UnicodeDecodeError`; a text file given to the json builder in `DatasetGenerationError`
after 111 lines, the file not named (streamed: in one line naming no file, after the LM loaded); a deleted SHA256SUMS turned verification off without a word; `ulimit -f` was
reported as an I/O error; an offline dataset name was refused only when loading."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

from sae_dist import cli, run_dir
from sae_dist.checksums import CHECKSUM_FILE
from sae_dist.config import DataConfig
from sae_dist.data import cache_writer, text
from sae_dist.data.builder_files import check_first_records
from sae_dist.data.cache import open_shards, shard_name
from sae_dist.data.source import DataUnavailableError
from sae_dist.data.synthetic import SyntheticSource
from sae_dist.run_dir import latest_checkpoint
from sae_dist.run_lock import LOCK_FILE
from tests.launch.conftest import ROOT

SMALL = ["data=synthetic", "sae.num_latents=512", "sae.num_experts=4", "trainer.batch_size=64", "trainer.steps=2",
         "trainer.checkpoint_every=1", "trainer.log_every=1", "data.shuffle_buffer=512", "trainer.progress=false",
         "trainer.tensorboard=false"]


def lock_as(folder: Path, pid: int) -> None:
    """A lock file of process `pid` on this host, taken now."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": pid, "started": time.time()}))


def test_a_folder_in_use_is_refused_naming_its_holder(command, no_loading, tmp_path):
    """This test's own process stands for a trainer that holds the folder; a dead holder's lock is taken over."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    lock_as(run, os.getpid())
    line = command("train.py", *SMALL, "sae.k=8", f"trainer.out_dir={run}").one_line_error(
        f"trainer.out_dir={run} is in use by pid {os.getpid()} on host {os.uname().nodename} since ")
    assert str(run / LOCK_FILE) in line
    lock_as(cache, os.getpid())
    command("cache_activations.py", "cache.progress=false", "cache.num_tokens=1000", f"cache.out_dir={cache}",
            ).one_line_error(f"cache.out_dir={cache} is in use by pid {os.getpid()}")
    lock_as(run, 2**22 + 4321)  # no such process: a holder that was killed
    with pytest.raises(AssertionError, match="loaded a model or data"):
        command("train.py", *SMALL, "sae.k=8", f"trainer.out_dir={run}")
    assert not (run / LOCK_FILE).exists(), "the dead holder's lock was neither taken over nor released"


def test_a_multirun_is_checked_whole_before_its_first_job(command, no_loading, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command("train.py", "-m", *SMALL, "sae.k=8,0").one_line_error("multirun job 1 (sae.k=0): sae.k=0 must be in [1,")
    command("train.py", "-m", *SMALL, "sae.k=8,4", f"trainer.out_dir={tmp_path / 'one'}").one_line_error(
        "multirun jobs (sae.k=8) and (sae.k=4) would share trainer.out_dir=")
    command("train.py", "-m", *SMALL, "sae.k=8,4", "trainer.resume=true").one_line_error(
        "multirun job 0 (sae.k=8): trainer.resume=true but trainer.out_dir=")
    assert list(tmp_path.iterdir()) == [], "a refused sweep created folders"
    with pytest.raises(AssertionError, match="loaded a model or data"):  # a good sweep reaches its first job
        command("train.py", "-m", *SMALL, "sae.k=8,4")


@pytest.fixture
def cache_run(command, tmp_path):
    """A 2-step run trained from a 64-d activation cache, and that cache's folder."""
    cache = tmp_path / "cache"
    cache_writer.write_cache(SyntheticSource(64, 128, 4, 0.01), cache, 4096, 2048)
    outcome = command("train.py", *SMALL[1:], "sae.k=8", "data.source=cache", f"data.cache_dir={cache}",
                      f"trainer.out_dir={tmp_path / 'run'}")
    assert outcome.status == 0, outcome.err[-2000:]
    return tmp_path / "run", cache


def test_damaged_run_inputs_are_one_line_before_loading(cache_run, command, no_loading, monkeypatch, capsys):
    run, cache = cache_run
    again = [f"trainer.out_dir={run}", "trainer.steps=4"]
    checkpoint = latest_checkpoint(run)
    sums = (checkpoint / CHECKSUM_FILE).read_bytes()

    (checkpoint / CHECKSUM_FILE).write_bytes(b"\xff\xfe" + os.urandom(298))
    fragment = f"{checkpoint / CHECKSUM_FILE} is not a SHA256SUMS file (not UTF-8 text)"
    command("train.py", *again).one_line_error(fragment)
    command("evaluate.py", str(run)).one_line_error(fragment)

    (checkpoint / CHECKSUM_FILE).unlink()
    monkeypatch.setattr(run_dir, "_warned_unchecked", set())
    with pytest.raises(AssertionError, match="loaded a model or data"):
        command("analyze.py", str(run))
    warning = f"warning: {checkpoint / CHECKSUM_FILE} does not exist: the checkpoint's files are read unchecked"
    assert warning in capsys.readouterr().err
    monkeypatch.setenv("SAE_DIST_REQUIRE_CHECKSUMS", "1")
    command("analyze.py", str(run)).one_line_error(f"{checkpoint / CHECKSUM_FILE} does not exist",
                                                   "SAE_DIST_REQUIRE_CHECKSUMS=1 refuses")
    command("train.py", *again).one_line_error("SAE_DIST_REQUIRE_CHECKSUMS=1 refuses")
    monkeypatch.delenv("SAE_DIST_REQUIRE_CHECKSUMS")
    (checkpoint / CHECKSUM_FILE).write_bytes(sums)

    model = checkpoint / "model.safetensors"  # a flipped byte: refused before the model and the data load
    weights = model.read_bytes()
    model.write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))
    command("train.py", *again).one_line_error("checkpoint damaged", "model.safetensors")
    model.write_bytes(weights)

    shutil.rmtree(cache)  # replaced by a cache of another model's width
    cache_writer.write_cache(SyntheticSource(32, 128, 4, 0.01), cache, 4096, 2048)
    command("train.py", *again).one_line_error(
        f"{checkpoint} was trained on activations of d_model=64, but data.cache_dir={cache} gives d_model=32")


def test_a_missing_checksum_file_is_said_once(cache_run, capsys, monkeypatch):
    """The default policy: read unchecked, with one warning per folder (not one per file read)."""
    run, _ = cache_run
    checkpoint = latest_checkpoint(run)
    (checkpoint / CHECKSUM_FILE).unlink()
    monkeypatch.setattr(run_dir, "_warned_unchecked", set())
    capsys.readouterr()
    for _ in range(2):
        run_dir.read_checkpoint_config(checkpoint)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: {checkpoint / CHECKSUM_FILE} does not exist: the checkpoint's files are read "
                   "unchecked (set SAE_DIST_REQUIRE_CHECKSUMS=1 to refuse such checkpoints)"]


@pytest.mark.parametrize("verify", [True, False])
def test_a_shard_with_a_garbage_header_is_named_without_reading_it(tmp_path, verify):
    cache = tmp_path / "cache"
    cache_writer.write_cache(SyntheticSource(16, 8, 2, 0.1), cache, 1000, 300)
    (cache / shard_name(0, 1)).write_text("garbage\n")  # 'garbage\n' read as a length is 7e17 bytes
    with pytest.raises(DataUnavailableError) as info:
        open_shards(cache, verify=verify)
    assert str(info.value) == f"activation cache shard {cache / shard_name(0, 1)} is corrupt (unreadable header)"


def json_files_one_of_them_text(folder: Path) -> tuple[Path, Path]:
    good, bad = folder / "d0.jsonl", folder / "d1.txt"
    good.write_text('{"text": "fine"}\n')
    bad.write_text("hello world\nsecond line\n")
    return good, bad


def test_a_file_the_builder_cannot_read_is_named(tmp_path):
    good, bad = json_files_one_of_them_text(tmp_path)
    data = DataConfig(dataset="json", data_files=[str(good), str(bad)], streaming=False)
    with pytest.raises(DataUnavailableError) as info:
        text.load_text_dataset(data)
    message = str(info.value)
    assert message.startswith(f"data.data_files: {bad} cannot be read by the 'json' builder (JSON parse error")
    assert "\n" not in message and message.endswith("is it a json file?")


@pytest.mark.parametrize("streaming", ["true", "false"])
@pytest.mark.parametrize("bad_first", [False, True])
def test_a_file_the_builder_cannot_read_is_named_before_loading(command, no_loading, tmp_path, streaming, bad_first):
    """Streamed, the text file given to 'json' formerly failed when training first read it, after the LM loaded,
    in one line that named no file."""
    good, bad = json_files_one_of_them_text(tmp_path)
    files = [bad, good] if bad_first else [good, bad]
    outcome = command("train.py", "data.dataset=json", f"data.data_files=[{files[0]},{files[1]}]",
                      f"data.streaming={streaming}", f"trainer.out_dir={tmp_path / 'run'}")
    assert outcome.one_line_error() == (f"error: data.data_files: {bad} cannot be read by the 'json' builder (JSON "
                                        "parse error: Invalid value. in row 0); is it a json file?")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("builder", "content", "reason"), [
    ("csv", 'a,b\n1,2\n"x\n', "Error tokenizing data. C error: EOF inside string starting at row 2"),
    ("parquet", '{"text": "fine"}\n', "Parquet magic bytes not found in footer."),
])
def test_a_damaged_file_of_another_builder_is_named(tmp_path, builder, content, reason):
    damaged = tmp_path / f"d.{builder}"
    damaged.write_text(content)
    with pytest.raises(DataUnavailableError) as info:
        check_first_records(DataConfig(dataset=builder, data_files=[str(damaged)]))
    assert str(info.value).startswith(f"data.data_files: {damaged} cannot be read by the '{builder}' builder "
                                      f"({reason}")


def test_a_file_size_limit_is_named(monkeypatch, capsys):
    limit = 1 << 16
    monkeypatch.setattr(cli, "file_size_limit", lambda: limit)
    with pytest.raises(SystemExit), cli.one_line_errors():
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), "/runs/a/model.safetensors")
    assert capsys.readouterr().err == (f"error: File too large (EFBIG: the file-size limit, ulimit -f, is {limit:,} "
                                       "bytes): /runs/a/model.safetensors\n")

    def too_large(tensors, path):
        raise cache_writer.SafetensorError("Error while serializing: I/O error: File too large (os error 27)")

    monkeypatch.setattr(cache_writer, "save_file", too_large)
    with pytest.raises(OSError) as info:
        cache_writer.save_shard(None, Path("shard.safetensors"))
    assert info.value.errno == errno.EFBIG and info.value.filename == "shard.safetensors"


def test_a_real_file_size_limit_during_a_checkpoint_is_one_line(tmp_path):
    """torch.save loses the errno of the refused write; under a finite `ulimit -f` it is named EFBIG."""

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    result = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), *SMALL, "sae.k=8", f"trainer.out_dir={tmp_path / 'run'}"],
        preexec_fn=limit_files, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "cannot write checkpoint step_00000001: File too large (EFBIG: the file-size limit, ulimit -f, is " \
           "200,000 bytes)" in lines[0]


def test_offline_a_dataset_in_no_cache_is_refused_without_the_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from sae_dist.data import source

    def no_network():
        raise AssertionError("asked the Hub")

    monkeypatch.setattr(source, "HfApi", no_network)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    data = DataConfig(dataset="org/corpus")
    with pytest.raises(DataUnavailableError, match=r"cannot download dataset 'org/corpus' from the Hub \("
                                                    r"HF_HUB_OFFLINE is set and it is in no Hugging Face cache"):
        text.require_hub_dataset(data)
    (tmp_path / "hub" / "datasets--org--corpus").mkdir(parents=True)
    text.require_hub_dataset(data)
    shutil.rmtree(tmp_path / "hub")
    (tmp_path / "datasets" / "org___corpus").mkdir(parents=True)
    text.require_hub_dataset(data)
