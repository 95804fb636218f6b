"""The SLURM scripts, run by bash against stand-ins for torchrun, srun and scontrol that record what they are asked
to do: GPU counts from the allocation, the run folder, the stop signal forwarded and the job requeued; and the
sweep launcher's configuration as the sbatch lines submitit writes from it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from sae_dist.config import register_configs

register_configs()

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "launch" / "slurm"

FAKE_TORCHRUN = """#!/bin/bash
# Records its arguments, OMP_NUM_THREADS and TORCH_DISABLE_SHARE_RDZV_TCP_STORE; runs until SIGUSR1/SIGTERM (then
# exits 1, as torchrun does after its ranks stopped), or exits with FAKE_EXIT at once when that is set.
printf '%s\\n' "$@" > "$FAKE_LOG/torchrun_args"
echo "$OMP_NUM_THREADS" > "$FAKE_LOG/omp_threads"
echo "${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-}" > "$FAKE_LOG/unshared_store"
if [[ -n "${FAKE_EXIT:-}" ]]; then exit "$FAKE_EXIT"; fi
trap 'echo USR1 >> "$FAKE_LOG/signals"; exit 1' USR1
trap 'echo TERM >> "$FAKE_LOG/signals"; exit 1' TERM
touch "$FAKE_LOG/started"
while true; do sleep 0.05; done
"""
FAKE_PYTHON = """#!/bin/bash
# The venv's python as the scripts call it, `python launch/torchrun.py ARGS`: records the launcher, runs the torchrun
# stand-in (whose status after a stop is 1 where launch/torchrun.py's is 75: the scripts requeue on either).
[[ "$1" == launch/torchrun.py ]] || { echo "unexpected: python $*" >&2; exit 97; }
shift
echo launch/torchrun.py > "$FAKE_LOG/launcher"
exec torchrun "$@"
"""
FAKE_SRUN = """#!/bin/bash
# Drops srun's own options and runs the command (one node's task).
echo "$@" > "$FAKE_LOG/srun_args"
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$@" >> "$FAKE_LOG/scontrol"
# A large allocation: a reader that stops after the first line makes this die of SIGPIPE.
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu-node-%02d\\n' {7..5000}; fi
"""


@pytest.fixture
def fake_cluster(tmp_path):
    """PATH with the stand-ins, a fake venv, and SLURM's variables for job 4242 on a node with 4 GPUs."""
    bin_dir, log, venv = tmp_path / "bin", tmp_path / "log", tmp_path / "venv"
    for folder in (bin_dir, log, venv / "bin"):
        folder.mkdir(parents=True)
    for name, text in (("torchrun", FAKE_TORCHRUN), ("python", FAKE_PYTHON), ("srun", FAKE_SRUN),
                       ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (venv / "bin" / "activate").write_text("")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "CUDA_VISIBLE"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), VENV=str(venv), SLURM_SUBMIT_DIR=str(ROOT),
               SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="32", SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_NODELIST="gpu-node-[07-08]")
    return env, log


def start(script: str, env: dict, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SLURM / script), *overrides], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_until_started(job: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Until the stand-in torchrun runs; fails at once with the script's output if the script ended before."""
    deadline = time.monotonic() + timeout
    while not (log / "started").exists():
        if job.poll() is not None or time.monotonic() > deadline:
            job.kill()
            out, err = job.communicate()
            pytest.fail(f"the script never started torchrun (status {job.returncode}):\n{out}\n{err}")
        time.sleep(0.02)


@pytest.mark.parametrize("stop_signal", [signal.SIGUSR1, signal.SIGTERM])
def test_single_node_forwards_the_stop_signal_and_requeues(fake_cluster, stop_signal):
    env, log = fake_cluster
    job = start("train_single_node.sbatch", env, "trainer.steps=10")
    wait_until_started(job, log)
    job.send_signal(stop_signal)
    out, err = job.communicate(timeout=20)
    assert job.returncode == 0, err
    assert (log / "signals").read_text().split() == [stop_signal.name[3:]]
    assert (log / "scontrol").read_text().split() == ["requeue", "4242"]
    assert "requeueing job 4242" in out
    assert (log / "launcher").read_text() == "launch/torchrun.py\n"  # one line and the worker's status on failure
    args = (log / "torchrun_args").read_text().split("\n")
    assert {"--standalone", "--nnodes=1", "--nproc-per-node=4", "--max-restarts=3"} <= set(args)
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in args
    assert args[args.index("launch/train.py"):-1] == [
        "launch/train.py", "+experiment=switch_65k", "trainer.out_dir=runs/switch_65k/slurm-4242",
        "trainer.resume=auto", "trainer.steps=10",
    ]
    assert (log / "omp_threads").read_text().strip() == "8"  # 32 CPUs over 4 ranks


@pytest.mark.parametrize("exit_status", [0, 3])
def test_a_run_that_ends_by_itself_is_not_requeued(fake_cluster, exit_status):
    env, log = fake_cluster
    env.update(FAKE_EXIT=str(exit_status), EXPERIMENT="topk_65k", OUT_DIR="/shared/runs/topk")
    job = start("train_single_node.sbatch", env)
    job.communicate(timeout=20)
    assert job.returncode == exit_status
    assert not (log / "scontrol").exists()
    args = (log / "torchrun_args").read_text().split("\n")
    assert "+experiment=topk_65k" in args and "trainer.out_dir=/shared/runs/topk" in args


def test_array_tasks_get_their_own_run_folder(fake_cluster):
    env, log = fake_cluster
    env.update(FAKE_EXIT="0", SLURM_ARRAY_JOB_ID="4200", SLURM_ARRAY_TASK_ID="7")
    start("train_single_node.sbatch", env).communicate(timeout=20)
    assert "trainer.out_dir=runs/switch_65k/slurm-4200_7" in (log / "torchrun_args").read_text().split("\n")


@pytest.mark.parametrize("script", ["train_single_node.sbatch", "train_multi_node.sbatch"])
def test_an_allocation_without_gpus_is_refused_in_one_line(fake_cluster, script):
    env, log = fake_cluster
    del env["SLURM_GPUS_ON_NODE"]
    job = start(script, env)
    _, err = job.communicate(timeout=20)
    assert job.returncode == 2
    assert err.strip().splitlines() == [f"error: the allocation has no GPU on {os.uname().nodename}; "
                                        "request them with --gpus-per-node=N"]
    assert not (log / "torchrun_args").exists()


def test_gpus_are_counted_from_cuda_visible_devices_without_slurm_gpus_on_node(fake_cluster):
    env, log = fake_cluster
    del env["SLURM_GPUS_ON_NODE"]
    env.update(CUDA_VISIBLE_DEVICES="0,1,2", FAKE_EXIT="0")
    start("train_single_node.sbatch", env).communicate(timeout=20)
    assert "--nproc-per-node=3" in (log / "torchrun_args").read_text().split("\n")


def test_multi_node_runs_one_torchrun_per_node_with_a_c10d_rendezvous(fake_cluster):
    env, log = fake_cluster
    job = start("train_multi_node.sbatch", env, "trainer.engine=deepspeed")
    wait_until_started(job, log)
    job.send_signal(signal.SIGUSR1)
    job.communicate(timeout=20)
    assert job.returncode == 0
    assert "--kill-on-bad-exit=1 python launch/torchrun.py" in (log / "srun_args").read_text()
    args = (log / "torchrun_args").read_text().split("\n")
    expected = {"--nnodes=2", "--nproc-per-node=4", "--rdzv-id=4242", "--rdzv-backend=c10d",
                "--rdzv-endpoint=gpu-node-07:29500", "parallel.ep_size=4", "trainer.engine=deepspeed",
                "trainer.out_dir=runs/switch_65k/slurm-4242", "trainer.resume=auto"}
    assert expected <= set(args)
    assert (log / "unshared_store").read_text() == "1\n"  # each restart's workers get a store of their own
    assert (log / "scontrol").read_text().split("\n")[-2] == "requeue 4242"


def test_scripts_refuse_to_run_outside_the_repository_root(fake_cluster, tmp_path):
    env, _ = fake_cluster
    env["SLURM_SUBMIT_DIR"] = str(tmp_path)
    (tmp_path / "launch" / "slurm").mkdir(parents=True)
    (tmp_path / "launch" / "slurm" / "common.sh").write_text((SLURM / "common.sh").read_text())
    job = start("train_single_node.sbatch", env)
    _, err = job.communicate(timeout=20)
    assert job.returncode == 2 and "submit from the repository root" in err


@pytest.mark.parametrize("experiment", ["paper/width_matched", "paper/flop_matched_n8"])
def test_sweep_launcher_writes_requeueable_single_gpu_jobs_with_stable_run_folders(
    experiment, tmp_path, fake_cluster, monkeypatch
):
    import submitit

    monkeypatch.setenv("PATH", fake_cluster[0]["PATH"])  # submitit's SLURM executor looks for srun

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={experiment}", "hydra/launcher=slurm"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    # The sbatch lines submitit writes from these settings, mapped as the Hydra plugin maps them.
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm", slurm_max_num_timeout=launcher.max_num_timeout)
    shared = ("timeout_min", "nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb")
    executor.update_parameters(**{key: launcher[key] for key in shared}, slurm_signal_delay_s=launcher.signal_delay_s,
                               slurm_additional_parameters=dict(launcher.additional_parameters))
    sbatch = executor._executor._make_submission_file_text("python launch/train.py", "uid").splitlines()
    for line in ("--requeue", "--signal=USR2@120", "--gpus-per-node=1", "--ntasks-per-node=1", "--open-mode=append"):
        assert f"#SBATCH {line}" in sbatch
    # Every job of the sweep trains into a folder named by its swept values, never by the job id.
    out_dirs = set()
    for k in cfg.hydra.sweeper.params["sae.k"].split(","):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            job_cfg = compose(config_name="config", overrides=[f"+experiment={experiment}", f"sae.k={k}"])
        out_dirs.add(job_cfg.trainer.out_dir)
        assert job_cfg.trainer.out_dir.endswith(f"k{k}")
    assert len(out_dirs) == len(cfg.hydra.sweeper.params["sae.k"].split(","))
