"""launch/train.py refuses every bad input with one line and exit status 2, before any model or data is loaded.

Each case formerly failed with a traceback (exit 1), a Hydra message over several lines, or was accepted without a
word."""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.distributed as dist

from sae_dist.cli import one_line_errors
from sae_dist.data import cache_writer
from sae_dist.data.synthetic import SyntheticSource
from sae_dist.run_dir import latest_checkpoint
from sae_dist.train.nonfinite import NO_UPDATE_EXIT_STATUS

TINY = ["data=synthetic", "sae.num_latents=512", "sae.num_experts=4", "sae.k=8", "trainer.batch_size=256",
        "trainer.steps=10", "trainer.progress=false", "trainer.tensorboard=false"]


@pytest.fixture
def out(tmp_path):
    return f"trainer.out_dir={tmp_path / 'run'}"


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("Some text.\n" * 50)
    return path


def cases(tmp_path, text_file):
    empty = tmp_path / "empty.txt"
    empty.touch()
    empty_folder = tmp_path / "model"
    empty_folder.mkdir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    block_3_cache = tmp_path / "block-3-cache"
    block_3_cache.mkdir()
    (block_3_cache / "manifest.json").write_text('{"site": {"layer": 3, "what": "output of block 3"}, "d_model": 384}')
    return [
        (["sae.bogus=1"], "Could not override 'sae.bogus'"),
        (["trainer.batch_size=abc"], "trainer.batch_size"),
        (["data.dataset=text", f"data.data_files=[{tmp_path / 'missing.txt'}]"], "missing.txt does not exist"),
        (["data.dataset=text", f"data.data_files=[{empty}]"], "empty.txt is empty"),
        ([f"data.data_files=[{text_file}]"], "data.data_files is read by data.dataset=text/json/csv/parquet/arrow, "
                                            "not by data.dataset='python-docs': add data.dataset=text"),
        (["data.dataset=text", f"data.data_files=[{tmp_path / '*.json'}]"], "no file matches"),
        (["data.dataset=text", f"data.data_files=[{tmp_path / 'em*.txt'}]"], "every file that"),
        ([f"model.path={empty_folder}", "data.dataset=text", f"data.data_files=[{text_file}]"],
         "holds no transformers model (no config.json)"),
        ([f"model.path={a_file}"], "is not a folder"),
        (["data.dataset=text", f"data.data_files=[{text_file}]", "data.split=validation"],
         "data.split='validation': a list of data.data_files makes one split, 'train'"),
        (["data.dataset=text", f"data.data_files=[{text_file}]", "data.text_column=body"],
         "data.text_column='body': the 'text' builder's column is 'text'"),
        (["data.source=cache", f"data.cache_dir={tmp_path / 'no-cache'}"], "no-cache is not a folder"),
        (["data.source=cache", f"data.cache_dir={empty_folder}"], "holds no activation cache (no manifest.json)"),
        (["trainer.adam_betas=[1.5,0.999]"], "trainer.adam_betas=[1.5, 0.999] must be two values in [0, 1)"),
        (["trainer.adam_eps=-1"], "trainer.adam_eps=-1.0 must be positive"),
        (["trainer.seed=-1"], "trainer.seed=-1 must be in"),
        (["sae.auxk_alpha=-1", "sae.auxk_k=-5"], "sae.auxk_alpha=-1.0 must be >= 0"),
        (["sae=relu", "sae.num_experts=1", "sae.l1_coefficient=-1"], "sae.l1_coefficient=-1.0 must be >= 0"),
        (["parallel.capacity_factor=1.25"], "parallel.capacity_factor=1.25 applies to expert-parallel dispatch"),
        (["sae.num_latents=1073741824"], "sae.num_latents=1073741824 needs about"),
        (["model.layer=6"], "model.layer=6 is beyond the model's 6 blocks (allowed: 0 to 5)"),
        (["data.ctx_len=100000"], "data.ctx_len=100000 exceeds the model's 512 positions"),
        # Sites are checked against the module names of the model's skeleton (meta device, no weights).
        (["model.hookpoint=encoder.layer.3.intermedate"],
         "model.hookpoint=encoder.layer.3.intermedate: the model has no module 'encoder.layer.3.intermedate'; "
         "closest: encoder.layer.3.intermediate"),
        (["model.hookpoint=encoder.layer.3:inside"], "the side='inside' is unknown; allowed: output, input"),
        (["model.hookpoint=embeddings:input"], "embeddings gets token ids or is called with keywords"),
        (["model.hookpoint=encoder.layer.*.attention"], "is a glob: put it in a sweep item"),
        (["model.hookpoint=mlp_out.6"], "model.hookpoint=mlp_out.6: block 6 is out of range"),
        (["sweep=[{model: {hookpoint: encoder.layer.*.mlp}}]"],
         "model.hookpoint=encoder.layer.*.mlp matches no module"),
        (["data.source=cache", f"data.cache_dir={block_3_cache}", "model.hookpoint=mlp_out.3"],
         "holds the output of block 3, not model.hookpoint=mlp_out.3"),
        # A transcoder's target site: its width against sae.d_out, from the skeleton.
        (["model.hookpoint=mlp_in.3", "model.target_hookpoint=mlp_out.3", "sae.d_out=100"],
         "model.target_hookpoint=mlp_out.3 is 384 wide, not sae.d_out=100: set sae.d_out=384"),
        (["model.hookpoint=mlp_in.3", "model.target_hookpoint=encoder.layer.3.outptu", "sae.d_out=384"],
         "model.target_hookpoint=encoder.layer.3.outptu: the model has no module"),
        (["sae.d_out=384"], "sae.d_out=384 makes a transcoder: with data.source=lm set model.target_hookpoint"),
        # A sweep of transcoders: glob pairs expanded over the skeleton's blocks.
        (["sae.d_out=384", "sweep=[{model: {hookpoint: 'mlp_in.[0-2]', target_hookpoint: mlp_out.*}}]"],
         "sweep[0]: model.target_hookpoint=mlp_out.* matches 6 sites but model.hookpoint=mlp_in.[0-2] matches 3"),
        (["sae.d_out=384", "sweep=[{model: {hookpoint: 'mlp_in.[0-2]', target_hookpoint: 'mlp_out.[3-5]'}}]"],
         "do not pair by block: their matches lie in blocks [0, 1, 2] and [3, 4, 5]"),
        (["sae.d_out=384", "sweep=[{model: {hookpoint: mlp_in.3, target_hookpoint: mlp_out.*}}]"],
         "model.target_hookpoint=mlp_out.* is a glob: pair it with a glob model.hookpoint"),
        (["model.hookpoint=mlp_in.*", "model.target_hookpoint=mlp_out.*", "sae.d_out=384"],
         "is a glob: put it in a sweep item (sweep=[{model: {hookpoint: 'mlp_in.*', target_hookpoint: 'mlp_out.*'}}])"),
        (["sweep=[{model: {hookpoint: mlp_in.*, target_hookpoint: 'encoder.layer.*.intermediate'}, sae: {d_out: 384}}]"],
         "model.target_hookpoint=encoder.layer.0.intermediate:output is 1536 wide, not sae.d_out=384"),
        (["data.source=cache", f"data.cache_dir={block_3_cache}", "model.target_hookpoint=mlp_out.3", "sae.d_out=384"],
         "holds an SAE's rows (one site, no target), not model.target_hookpoint=mlp_out.3"),
        (["trainer.resume=true"], "trainer.resume=true but trainer.out_dir="),
        (["+experiment=nope"], "Could not find 'experiment/nope'; allowed: "),
        # Only the Hub has them, and it does not answer (offline) or has no such repository: told before the run
        # folder is made, not at the model's loading.
        (["model.name=sae-dist-tests/no-such-model"], "cannot download model 'sae-dist-tests/no-such-model'"),
        (["data.dataset=sae-dist-tests/no-such-dataset"], "cannot download dataset 'sae-dist-tests/no-such-dataset'"),
    ]


def test_every_bad_input_is_one_line_before_loading(command, no_loading, out, tmp_path, text_file):
    """The quickstart command with one bad value each (nothing is loaded: see the `no_loading` tripwire)."""
    for overrides, fragment in cases(tmp_path, text_file):
        outcome = command("train.py", *overrides, out)
        line = outcome.one_line_error(fragment)
        assert "Traceback" not in outcome.err, line
    assert not (tmp_path / "run").exists(), "a refused command created its run folder"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(command, no_loading, out):
    command("train.py", *TINY, "trainer.device=cuda", out).one_line_error("trainer.device='cuda' but no CUDA device")


def test_output_folder_that_is_a_file_or_under_one(command, no_loading, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    command("train.py", *TINY, f"trainer.out_dir={blocker}").one_line_error("cannot be a folder: it is a file")
    command("train.py", *TINY, f"trainer.out_dir={blocker}/run").one_line_error(f"lies under the file {blocker}")


@pytest.mark.parametrize("cache_file", ["manifest.json", "shard_00000_000000.safetensors", "progress_00001.json"])
def test_an_output_folder_that_holds_a_cache_is_refused(command, no_loading, tmp_path, cache_file):
    """trainer.out_dir=CACHE, meant as data.cache_dir=CACHE (a finished or an unfinished cache): refused before
    anything is written into the cache's folder."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / cache_file).write_text("{}")
    command("train.py", *TINY, f"trainer.out_dir={cache}").one_line_error(
        f"trainer.out_dir={cache} holds an activation cache; train on it with data=cache data.cache_dir={cache}")
    assert [entry.name for entry in cache.iterdir()] == [cache_file]


def test_a_checkpoint_as_output_folder_is_refused_naming_its_run(command, no_loading, tmp_path):
    """trainer.out_dir=RUN/checkpoints/step_N, meant to continue RUN from it: refused, naming RUN's folder (a run
    written inside a checkpoint would be deleted with it by the rotation)."""
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"")
    command("train.py", *TINY, f"trainer.out_dir={checkpoint}").one_line_error(
        f"trainer.out_dir={checkpoint} is a checkpoint or a model folder (config.json, model.safetensors), which a "
        f"run never writes into; its run continues with trainer.out_dir={tmp_path / 'run'}")
    assert sorted(entry.name for entry in checkpoint.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["trainer.batch_size=63"], "trainer.batch_size=63 is not divisible by the world size 2"),
        (["parallel.ep_size=3"], "parallel.ep_size=3 does not divide the world size 2"),
        (["sae.num_experts=3", "sae.num_latents=384", "parallel.ep_size=2"],
         "sae.num_experts=3 is not divisible by parallel.ep_size=2"),
    ],
)
def test_torchrun_layout_errors_print_once_and_every_rank_exits_2(command, no_loading, monkeypatch, out, overrides,
                                                                  fragment):
    """Under torchrun (WORLD_SIZE=2) every rank refuses before joining the process group; rank 0 alone prints."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        outcome = command("train.py", *TINY, *overrides, out)
        assert outcome.status == 2 and not dist.is_initialized()
        if rank == 0:
            outcome.one_line_error(fragment)
        else:
            assert outcome.err.strip() == ""


@pytest.mark.parametrize("glob", [False, True])
def test_a_good_command_gets_past_the_checks(command, no_loading, out, text_file, glob):
    """The documented local-text form passes every check and reaches the loading (the tripwire); so does a
    recursive glob that also matches an empty file (a package's __init__.py in the README's site-packages corpus,
    refused before)."""
    (text_file.parent / "pkg").mkdir()
    (text_file.parent / "pkg" / "__init__.txt").touch()
    files = text_file.parent / "**" / "*.txt" if glob else text_file
    with pytest.raises(AssertionError, match="loaded a model or data"):
        command("train.py", "data.dataset=text", f"data.data_files=['{files}']", out)


def test_a_dataset_that_refuses_the_request_is_one_line(capsys):
    """What only `datasets` can tell (a Hub dataset's split or column) ends in one line, not its traceback."""
    with pytest.raises(SystemExit) as info, one_line_errors():
        datasets.Dataset.from_dict({"body": ["x"]}).select_columns(["text"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the dataset refused the request") and "Column name ['text'] not in" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError), one_line_errors():  # any other ValueError is a bug: it keeps its traceback
        raise ValueError("a bug")


class NaNSource(SyntheticSource):
    """Synthetic activations of which every value is NaN (a broken producer)."""

    def next_batch(self, batch_size: int) -> torch.Tensor:
        return torch.full_like(super().next_batch(batch_size), float("nan"))


def test_an_all_nan_cache_under_skip_exits_65_and_publishes_no_checkpoint(command, tmp_path):
    """Formerly exit 0 with `MSE nan`, warnings on stdout only, and the untrained weights published as `latest`."""
    cache = tmp_path / "cache"
    cache_writer.write_cache(NaNSource(64, 128, 4, 0.01), cache, 2048, 1024)
    outcome = command("train.py", *TINY[1:], "data.source=cache", f"data.cache_dir={cache}",
                      "trainer.checkpoint_every=5", "trainer.on_nonfinite=skip", f"trainer.out_dir={tmp_path / 'run'}")
    assert outcome.status == NO_UPDATE_EXIT_STATUS, outcome.err[-2000:]
    [line] = outcome.error_lines
    assert line.startswith("error: no update applied: every step of the run skipped for NaN or inf"), line
    assert "10 steps since step 1" in line and "check the activations" in line and "Traceback" not in outcome.err
    assert latest_checkpoint(tmp_path / "run") is None
