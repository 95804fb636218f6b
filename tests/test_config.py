"""Configuration: every shipped experiment composes and validates; bad values fail with one clear line."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from sae_dist import validation
from sae_dist.config import (
    ConfigError,
    RunConfig,
    SAEConfig,
    as_dict,
    option_facts,
    options_where,
    register_configs,
)
from sae_dist.eval import runs
from sae_dist.option_facts import ARCHITECTURE, CHECKERS, LAYOUT, ON_RESUME, PREFLIGHT, VALIDATE
from sae_dist.train import identity
from sae_dist.validation import error_line, from_dict, sweep_members, to_run_config

register_configs()

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_run(*overrides: str) -> RunConfig:
    """The run `launch/train.py OVERRIDES` would train; Hydra's errors become one-line ConfigErrors as there."""
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(error_line(exc)) from None
    return to_run_config(cfg)


def test_default_config_is_the_quickstart():
    default, quickstart = compose_run(), compose_run("+experiment=quickstart")
    assert default.sae == quickstart.sae and default.model == quickstart.model and default.data == quickstart.data
    assert default.model.name == "minilm-bundled" and default.data.dataset == "python-docs"


@pytest.mark.parametrize(("group", "experts"), [("topk", 1), ("relu", 1), ("switch", 8)])
def test_sae_group_choice_on_the_quickstart_takes_the_groups_expert_count(group, experts):
    run = compose_run(f"sae={group}")
    assert (run.sae.kind, run.sae.num_experts, run.sae.num_latents) == (group, experts, 6144)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    compose_run(f"+experiment={experiment}")


def test_switch_65k_is_the_paper_recipe():
    run = compose_run("+experiment=switch_65k")
    assert (run.sae.kind, run.sae.num_latents, run.sae.num_experts, run.sae.k) == ("switch", 65536, 8, 32)
    assert run.sae.lb_alpha == 3.0 and run.trainer.lr is None
    assert (run.trainer.batch_size, run.trainer.steps) == (8192, 100_000)
    assert (run.model.name, run.model.layer) == ("openai-community/gpt2", 8)
    assert run.data.dataset == "Skylion007/openwebtext" and run.data.ctx_len == 128
    topk = compose_run("+experiment=topk_65k")
    assert (topk.sae.kind, topk.sae.num_latents, topk.sae.num_experts) == ("topk", 65536, 1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sae.num_latents=1000", "sae.num_experts=3"], "sae.num_latents=1000 is not divisible by sae.num_experts=3"),
        (["sae.num_latents=1024", "sae.num_experts=8", "sae.k=200"], r"sae.k=200 must be in \[1, M/N=128\]"),
        (["sae.kind=gated"], "sae.kind='gated' is unknown; allowed: switch, topk, relu"),
        (["sae=topk", "sae.num_experts=4"], "sae.num_experts=4 must be 1 for sae.kind='topk'"),
        (["data.source=cache"], "data.cache_dir must be set"),
        (["parallel.capacity_factor=-1"], "parallel.capacity_factor=-1.0 must be positive"),
        (["sae=topk", "sae.num_experts=1", "parallel.capacity_factor=1.25"],
         "parallel.capacity_factor=1.25 applies to Switch SAEs only"),
        (["trainer.batch_size=abc"], "trainer.batch_size: Value 'abc' of type 'str' could not be converted"),
        (["trainer.adam_betas=[1.5,0.999]"], r"trainer.adam_betas=\[1.5, 0.999\] must be two values in \[0, 1\)"),
        (["trainer.adam_betas=[0.9]"], "trainer.adam_betas=.* must be two values"),
        (["trainer.adam_eps=-1"], "trainer.adam_eps=-1.0 must be positive"),
        (["trainer.seed=-1"], r"trainer.seed=-1 must be in \[0, 2\^63 - 1\]"),
        (["sae.auxk_alpha=-1"], "sae.auxk_alpha=-1.0 must be >= 0"),
        (["sae.auxk_k=-5"], "sae.auxk_k=-5 must be positive"),
        (["sae=relu", "sae.num_experts=1", "sae.l1_coefficient=-1"], "sae.l1_coefficient=-1.0 must be >= 0"),
        (["trainer.resume=maybe"], "trainer.resume='maybe' is unknown; allowed: auto, true, false"),
        (["trainer.on_nonfinite=ignore"], "trainer.on_nonfinite='ignore' is unknown; allowed: stop, skip"),
        (["parallel.timeout_s=0"], "parallel.timeout_s=0.0 must be positive"),
        (["parallel.a2a_chunks=0"], "parallel.a2a_chunks=0 must be positive"),
        (["sae.decoder_kernel=dense"], "sae.decoder_kernel='dense' is unknown; allowed: auto, gather, gemm"),
        (["trainer.optimizer_state=bfloat16", "trainer.engine=deepspeed"],
         "trainer.optimizer_state='bfloat16' needs trainer.engine=torch"),
        (["trainer.out_dir= "], "trainer.out_dir must not be empty"),
        (["trainer.profile_steps=-1"], r"trainer.profile_steps=-1 must be 0 \(none\) or positive"),
        (["data=synthetic", "data.synthetic_noise=-0.1"], "data.synthetic_noise=-0.1 must be >= 0"),
        (["data=openwebtext", "data.pretokenize=true"], "data.pretokenize=true needs data.streaming=false"),
        (["sae.bogus=1"],
         r"Could not override 'sae.bogus'.*\+sae.bogus=1 \(sae.bogus: Key 'bogus' not in 'SAEConfig'\)"),
        (["sae=gated"], "Could not find 'sae/gated'; allowed: relu, switch, topk"),
        (["trainer.steps"], "Error parsing override 'trainer.steps'"),
    ],
)
def test_bad_values_give_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        compose_run(*overrides)
    assert "\n" not in str(info.value)


def test_documented_key_value_forms_work_as_written(tmp_path):
    """`data.data_files=[a.txt]` and `data.cache_dir=...` as the README and the error hints write them (formerly:
    Hydra's `Key ... is not in struct`; only `+data.data_files=` worked)."""
    run = compose_run("data.dataset=text", "data.data_files=[a.txt,b.txt]", f"data.cache_dir={tmp_path}",
                      "model.path=/models/gpt2", "sae.l1_coefficient=2")
    assert run.data.data_files == ["a.txt", "b.txt"] and run.data.cache_dir == str(tmp_path)
    assert run.model.path == "/models/gpt2" and run.sae.l1_coefficient == 2
    assert compose_run("data=synthetic", "data.data_files=[a.txt]").data.data_files == ["a.txt"]


def test_trainer_resume_accepts_booleans_and_auto():
    assert compose_run().trainer.resume == "auto"
    assert compose_run("trainer.resume=true").trainer.resume == "true"
    assert compose_run("trainer.resume=false").trainer.resume == "false"


def test_launcher_reports_bad_config_in_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "launch/train.py", "sae.num_latents=100", "sae.num_experts=8",
         f"trainer.out_dir={tmp_path}/run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: sae.num_latents=100 is not divisible by sae.num_experts=8"
    assert not (tmp_path / "run").exists()


def test_paper_experiment_without_network_fails_at_once_naming_the_download(tmp_path):
    """switch_65k needs GPT-2 from the Hub: offline it stops in one line saying how to use a local copy."""
    import os
    import time

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "launch/train.py", "+experiment=switch_65k", f"trainer.out_dir={tmp_path}/run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "openai-community/gpt2" in lines[0] and "model.path=" in lines[0]
    assert elapsed < 60


# --- each option's facts ----------------------------------------------------------------------------------------
CHECKER_SOURCES = {
    VALIDATE: ROOT / "sae_dist" / "validation.py",
    LAYOUT: ROOT / "sae_dist" / "parallel" / "mesh.py",
    PREFLIGHT: ROOT / "sae_dist" / "train" / "preflight.py",
    ARCHITECTURE: ROOT / "sae_dist" / "models" / "base.py",
}


def test_every_option_declares_its_facts():
    facts = option_facts()
    assert len(facts) == 82 and "sae.k" in facts and "parallel.timeout_s" in facts
    for name, fact in facts.items():
        assert fact.on_resume in ON_RESUME, name
        assert set(fact.checked_by) <= set(CHECKERS), name


def test_the_checkers_an_option_names_read_it():
    """An option that names a checker is read by that checker's code (its dotted or its bare name)."""
    code = {checker: path.read_text() for checker, path in CHECKER_SOURCES.items()}
    validate_code = code[VALIDATE][code[VALIDATE].index("def validate("):]
    code[VALIDATE] = validate_code
    for name, fact in option_facts().items():
        for checker in fact.checked_by:
            bare = name.rsplit(".", 1)[-1]
            assert name in code[checker] or f'"{bare}"' in code[checker] or f".{bare}" in code[checker], (name, checker)


def test_identity_and_plots_read_the_declared_facts():
    """What a continued run may change and what never splits a plot's line: the settings of before the facts moved
    beside the options, now derived from them."""
    assert set(identity.MAY_CHANGE) == {
        "name", "trainer.steps", "trainer.log_every", "trainer.checkpoint_every", "trainer.keep_checkpoints",
        "trainer.progress", "trainer.tensorboard", "trainer.wandb", "trainer.wandb_project", "trainer.wandb_name",
        "trainer.wandb_mode", "trainer.profile_steps", "trainer.device", "trainer.on_nonfinite",
        "trainer.engine", "trainer.zero_stage", "parallel.ep_size", "parallel.timeout_s", "data.lm_batch_size",
        "data.prefetch", "data.tokenizer_workers", "data.pretokenize", "data.cache_verify",
    }
    assert set(identity.THIS_INVOCATION) == {"trainer.out_dir", "trainer.resume"}
    assert runs.NOT_COMPARED == (set(identity.MAY_CHANGE) | set(identity.THIS_INVOCATION)) - {"trainer.steps"}


def test_performance_switches_are_declared_apart():
    assert options_where(lambda facts: facts.performance) == (
        "sae.encoder_backward_kernel", "sae.decoder_kernel", "sae.encoder_backward", "sae.decoder", "model.compile",
        "data.lm_batch_size", "data.prefetch", "data.tokenizer_workers", "data.pretokenize",
        "trainer.optimizer_state", "trainer.cuda_graph", "trainer.engine", "trainer.zero_stage", "parallel.a2a_chunks",
    )


def test_renamed_options_are_read_under_their_old_names_everywhere(capsys, monkeypatch):
    """Python code, a sweep item and a config file written before the rename set the new names; a note comes from a
    command line or a sweep item only, from rank 0 only, and only when the config is valid: a bad value under an old
    name is its error alone, one line that says the rename (the run folder's resume: tests/train/test_identity.py)."""
    monkeypatch.setattr(validation, "_RENAMES_NOTED", set())
    sae = SAEConfig(encoder_backward="gemm", decoder="gemm")
    assert (sae.encoder_backward_kernel, sae.decoder_kernel, sae.encoder_backward, sae.decoder) == (
        "gemm", "gemm", None, None)
    old_file = as_dict(compose_run())
    old_file["sae"] = {**old_file["sae"], "encoder_backward": "sparse", "decoder": "gemm"}
    del old_file["sae"]["decoder_kernel"], old_file["sae"]["encoder_backward_kernel"]
    loaded = from_dict(old_file)
    assert (loaded.sae.encoder_backward_kernel, loaded.sae.decoder_kernel) == ("sparse", "gemm")
    assert "decoder" not in as_dict(loaded)["sae"] and "encoder_backward" not in as_dict(loaded)["sae"]
    monkeypatch.setenv("RANK", "1")
    assert compose_run("sae.decoder=gemm").sae.decoder_kernel == "gemm"
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    renamed = (r"sae.decoder_kernel='fast' is unknown; allowed: auto, gather, gemm "
               r"\(sae.decoder is renamed sae.decoder_kernel\)$")
    for bad in ("sae.decoder=fast", "sweep=[{sae.decoder: fast}]"):
        with pytest.raises(ConfigError, match=renamed):
            compose_run("data=synthetic", bad)
    with pytest.raises(ConfigError, match="trainer.steps=0 must be positive$"):
        compose_run("sae.decoder=gemm", "trainer.steps=0")
    assert capsys.readouterr().err == ""
    members = sweep_members(compose_run("data=synthetic", "sweep=[{sae.decoder: gemm}, {sae.k: 16}]"))
    assert [m.sae.decoder_kernel for m in members] == ["gemm", "auto"]
    assert capsys.readouterr().err.splitlines() == [
        ("note: sae.decoder is renamed sae.decoder_kernel; sae.decoder=gemm is read as sae.decoder_kernel=gemm until "
         "the next release")]


def test_importing_the_config_registers_nothing_with_hydra():
    code = ("import sys; from hydra.core.config_store import ConfigStore; import sae_dist.config as c; "
            "print(c.SCHEMA_NAME + '.yaml' in ConfigStore.instance().repo); c.register_configs(); "
            "print(c.SCHEMA_NAME + '.yaml' in ConfigStore.instance().repo)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out == ["False", "True"]
