# shellcheck shell=bash
# Shared by the sbatch scripts in this folder (sourced from the repository root, where sbatch was called).
#
# Preemption and time limits: the scripts ask SLURM for SIGUSR1 on the batch shell 120 s before the time limit
# (--signal=B:USR1@120). `run_until_stopped` forwards it to torchrun, which hands it to every rank
# (--signals-to-handle); each rank finishes its step, writes a checkpoint and exits; the script then requeues the
# job, which keeps its job id, so the requeued job computes the same run folder and continues it
# (trainer.resume=auto). SIGTERM (preemption, or a time limit reached without the warning) is forwarded the same
# way.

# The job's name for run folders: '<array job id>_<task id>' for an array task, else the job id. Both survive a
# requeue (scontrol requeue keeps the id and counts SLURM_RESTART_COUNT); a new submission gets a new one.
job_tag() {
    if [[ -n "${SLURM_ARRAY_JOB_ID:-}" && -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
        echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    else
        echo "${SLURM_JOB_ID:?not inside a SLURM job}"
    fi
}

# GPUs SLURM allocated on this node (from --gpus-per-node or --gres); exits 2 with one line when there are none.
gpus_on_node() {
    local gpus="${SLURM_GPUS_ON_NODE:-}"
    if [[ -z "$gpus" && -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
    fi
    if [[ -z "$gpus" || "$gpus" -lt 1 ]]; then
        echo "error: the allocation has no GPU on $(hostname); request them with --gpus-per-node=N" >&2
        exit 2
    fi
    echo "$gpus"
}

# CPU threads per rank: the task's CPUs shared by its `$1` ranks (at least 1).
threads_per_rank() {
    local threads=$(( ${SLURM_CPUS_PER_TASK:-1} / $1 ))
    echo $(( threads > 0 ? threads : 1 ))
}

# The repository's virtual environment (VENV, default .venv; `make install` creates it).
activate_venv() {
    local venv="${VENV:-.venv}"
    if [[ ! -f "$venv/bin/activate" ]]; then
        echo "error: no virtual environment at $venv; run 'make install' in the repository root or set VENV" >&2
        exit 2
    fi
    # shellcheck source=/dev/null
    source "$venv/bin/activate"
}

# Refuse to run outside the repository root (logs/ and every relative path in the scripts start there).
require_repository_root() {
    if [[ ! -f launch/train.py || ! -d logs ]]; then
        echo "error: submit from the repository root (sbatch launch/slurm/...); SLURM_SUBMIT_DIR=$PWD" >&2
        exit 2
    fi
}

# The launcher: torchrun's agent (the same options, restarts and signal handling) that ends a failed job with one line
# and the failed worker's exit status (2 bad input, 65 no update, 75 stopped, 1 crash), not torchrun's traceback and 1.
# shellcheck disable=SC2034  # used by the scripts that source this file
TORCHRUN=(python launch/torchrun.py)

# torchrun options shared by both scripts: restart crashed ranks (they resume from the latest checkpoint), hand
# SIGUSR1 to the ranks as well as SIGTERM, and give them 100 s (of the 120 s warning) to write their checkpoint.
# shellcheck disable=SC2034  # used by the scripts that source this file
TORCHRUN_RESILIENCE=(--max-restarts=3 "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" --shutdown-timeout=100)
# A store of its own for each restart's workers: in the rendezvous store, which every attempt shares, a restarted
# rank can read a dead rank's address and fail to connect, wasting a restart (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

STOP_SIGNAL=""

# Run "$@" in the background, forward SIGUSR1 / SIGTERM to it, wait for it; if it stopped on such a signal
# (non-zero status after the signal), requeue the job and return 0; otherwise return its exit status.
run_until_stopped() {
    local pid=""
    trap 'STOP_SIGNAL=USR1; forward_stop "$pid"' USR1
    trap 'STOP_SIGNAL=TERM; forward_stop "$pid"' TERM
    "$@" &
    pid=$!
    forward_stop "$pid"  # a signal that came before the command started
    local status=0
    while true; do
        wait "$pid" && status=0 || status=$?
        kill -0 "$pid" 2>/dev/null || break  # still running: `wait` was interrupted by a forwarded signal
    done
    trap - USR1 TERM
    if [[ -n "$STOP_SIGNAL" && "$status" -ne 0 ]]; then
        echo "stopped by SIG$STOP_SIGNAL with a checkpoint written; requeueing job $(job_tag)"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    return "$status"
}

# Send the stop signal received so far (if any) to process $1 (if started and still running).
forward_stop() {
    if [[ -n "$STOP_SIGNAL" && -n "$1" ]]; then
        kill "-$STOP_SIGNAL" "$1" 2>/dev/null || true
    fi
}
