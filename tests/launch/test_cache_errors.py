"""launch/cache_activations.py refuses every bad input with one line and exit status 2, before the model is loaded,
and creates nothing."""

from __future__ import annotations

import pytest

import sae_dist.data
from sae_dist.data.cache import MANIFEST


@pytest.fixture
def no_model(monkeypatch, no_loading):
    """The app imports `load_lm` from sae_dist.data: trip that one too."""
    import sae_dist.data.lm

    monkeypatch.setattr(sae_dist.data, "load_lm", sae_dist.data.lm.load_lm)


def test_every_bad_input_is_one_line_before_loading(command, no_model, tmp_path):
    empty_folder = tmp_path / "model"
    empty_folder.mkdir()
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / MANIFEST).write_text("{}")
    run_folder = tmp_path / "run"  # a checkpoint, a run folder, a model: shards are never mixed into them
    (run_folder / "checkpoints").mkdir(parents=True)
    (run_folder / "config.yaml").write_text("name: quickstart\n")
    (run_folder / "progress_00000.json").write_text("{}")
    out = f"cache.out_dir={tmp_path / 'cache'}"
    cases = [
        (["cache.dtype=int8", out], "cache.dtype='int8' is unknown; allowed: float32, bfloat16, float16"),
        (["cache.num_tokens=0", out], "cache.num_tokens=0 must be positive"),
        (["cache.bogus=1", out], "Could not override 'cache.bogus'"),
        (["data.source=synthetic", out], "a cache is written from data.source=lm"),
        ([f"model.path={empty_folder}", out], "holds no transformers model (no config.json)"),
        (["data.dataset=text", f"data.data_files=[{tmp_path / 'missing.txt'}]", out], "missing.txt does not exist"),
        ([f"cache.out_dir={blocker}"], "cannot be a folder: it is a file"),
        (["cache.num_tokens=1000000000000000", out], "free on its disk", "activations of d = 384 in bfloat16"),
        ([f"cache.out_dir={finished}"], f"cache.out_dir={finished} already holds an activation cache"),
        ([f"cache.out_dir={run_folder}"],
         f"cache.out_dir={run_folder} holds what no cache job writes ('checkpoints' and 1 more); choose a new"),
    ]
    for overrides, *fragments in cases:
        outcome = command("cache_activations.py", "cache.progress=false", *overrides)
        line = outcome.one_line_error(*fragments)
        assert "Traceback" not in outcome.err, line
    assert not (tmp_path / "cache").exists(), "a refused command created its output folder"
    assert sorted(p.name for p in finished.iterdir()) == [MANIFEST]
    assert sorted(p.name for p in run_folder.iterdir()) == ["checkpoints", "config.yaml", "progress_00000.json"]


def test_a_good_command_gets_past_the_checks(command, no_model, tmp_path):
    """The README's command passes every check and reaches the loading (the tripwire)."""
    with pytest.raises(AssertionError, match="loaded a model or data"):
        command("cache_activations.py", f"cache.out_dir={tmp_path / 'cache'}", "cache.num_tokens=1000")


def test_ctrl_c_is_one_line_saying_the_same_command_continues(command, monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sae_dist.data, "load_lm", interrupted)
    outcome = command("cache_activations.py", "cache.progress=false", f"cache.out_dir={tmp_path / 'cache'}")
    assert outcome.status == 130
    assert outcome.err == (f"interrupted by SIGINT; the shards written so far are kept; the same command continues "
                           f"the cache in cache.out_dir={tmp_path / 'cache'}\n")
    assert not (tmp_path / "cache" / ".lock").exists()
