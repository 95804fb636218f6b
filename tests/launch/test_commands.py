"""The launch tools as a user meets them: --help with every option explained and its default, an option that does
not parse is one line (exit 2), the README's autointerp command, and Hydra sweeps that train into folders named
by their swept values."""

from __future__ import annotations

import json
import re
import shutil

import pytest

TOOLS = ["evaluate.py", "analyze.py", "plot.py", "inspect_features.py", "autointerp.py", "export.py"]


@pytest.mark.parametrize("tool", TOOLS)
def test_help_explains_every_option_with_its_default(command, tool):
    outcome = command(tool, "--help")
    assert outcome.status == 0 and outcome.out.startswith("usage: ")
    options = outcome.out.split("\noptions:\n", 1)[1]
    entries = re.split(r"\n(?=  -)", options.strip("\n"))
    for entry in entries:
        flags, _, text = entry.strip().partition("  ")
        assert text.strip(), f"{tool}: {flags} has no help text"
    assert "(default: " in options or tool == "plot.py"  # plot.py's only option, --out, is required


def test_an_option_that_does_not_parse_is_one_line(command, no_loading, tmp_path):
    command("evaluate.py", str(tmp_path), "--batches", "two").one_line_error(
        "argument --batches: invalid int value: 'two'", "evaluate.py --help")
    command("analyze.py", str(tmp_path), "--bogus").one_line_error("unrecognized arguments: --bogus")
    command("plot.py", "--out", str(tmp_path)).one_line_error("the following arguments are required: run_dirs")


def test_autointerp_as_the_readme_shows_it(command, minilm_checkpoint, fake_endpoint, tmp_path, monkeypatch):
    """`autointerp.py RUN --base-url URL --model MODEL` (no --out) writes CHECKPOINT/autointerp.json."""
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(minilm_checkpoint, checkpoint)
    outcome = command("autointerp.py", str(checkpoint), "--base-url", fake_endpoint["url"], "--model", "fake",
                      "--latents", "49", "97", "--contexts", "24")
    assert outcome.status == 0, outcome.err[-2000:]
    result = json.loads((checkpoint / "autointerp.json").read_text())
    assert [r["latent"] for r in result["latents"]] == [49, 97]
    assert all(r["explanation"] == "the word hot" for r in result["latents"])
    assert str(checkpoint / "autointerp.json") in outcome.out


def test_autointerp_refuses_a_model_the_endpoint_does_not_serve(command, no_loading, minilm_checkpoint,
                                                                 fake_endpoint, tmp_path):
    outcome = command("autointerp.py", str(minilm_checkpoint), "--out", str(tmp_path / "a.json"), "--base-url",
                      fake_endpoint["url"], "--model", "other")
    outcome.one_line_error(f"--model=other is not served by --base-url={fake_endpoint['url']} (it serves: fake)")
    assert fake_endpoint["requests"] == []  # nothing asked of the model


def test_sweep_jobs_train_into_folders_named_by_their_swept_values(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outcome = command("train.py", "-m", "data=synthetic", "data.d_model=32", "sae.num_latents=64",
                      "sae.num_experts=2", "sae.k=4,8", "trainer.steps=2", "trainer.batch_size=32",
                      "trainer.progress=false", "trainer.tensorboard=false")
    assert outcome.status == 0, outcome.err[-2000:]
    [sweep] = [p for p in (tmp_path / "runs/quickstart").iterdir() if p.is_dir()]  # one folder per sweep
    assert sorted(p.name for p in sweep.iterdir()) == ["sae.k=4", "sae.k=8"]
    for k in (4, 8):
        assert (sweep / f"sae.k={k}/checkpoints/latest").is_file()
        assert f"k: {k}\n" in (sweep / f"sae.k={k}/config.yaml").read_text()
