#!/usr/bin/env bash
# Every GPU check and figure of docs/performance.md in one bounded run: at most 13 minutes (the parts' limits; 1.5
# more with py-spy), not yet run whole; the parts run on an H200 took 20 to 60 s each:
#   bash benchmarks/gpu_suite.sh [LOG_DIR] [TOKENIZER_DIR]
#   GPU_SUITE_PARTS="cuda_tests step_65k lm job step_1m" bash benchmarks/gpu_suite.sh LOG_DIR   # these parts only
# LOG_DIR (default gpu_logs/) receives all.log, every part's output appended as it ends (so a run cut short keeps
# what it did), and the jobs' metrics; TOKENIZER_DIR pairs the random GPT-2 with a tokenizer where the bundled
# MiniLM package is not installed (a copy of its tokenizer files). Each part has its own time limit, so a failure
# or a hang costs that part only; the most telling parts run first, and the tables are printed at the end.
# GPU_SUITE_PARTS (space-separated part names) splits the suite over calls shorter than its whole. Where py-spy is
# on the PATH, the live job is also profiled by thread (GIL holders only: benchmarks/stack_profile.py; part
# job_gil_profile).
set -u
LOG=${1:-gpu_logs}
TOKENIZER=${2:-}
PARTS=$(mktemp -d)
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
wanted() { [ -z "${GPU_SUITE_PARTS:-}" ] || [[ " $GPU_SUITE_PARTS " == *" $1 "* ]]; }
part() {
  local name=$1 limit=$2 status
  shift 2
  wanted "$name" || return 0
  echo "=== $name (limit ${limit}s, at $(($(date +%s) - T0))s)"
  timeout "$limit" "$@" >"$PARTS/$name.log" 2>&1
  status=$?
  { echo "########## $name: exit $status at $(($(date +%s) - T0))s"; cat "$PARTS/$name.log"; } >>"$LOG/all.log"
  echo "=== $name exit $status at $(($(date +%s) - T0))s"
}
TOKENIZER_ARGS=()
[ -n "$TOKENIZER" ] && TOKENIZER_ARGS=(--tokenizer "$TOKENIZER")
GPT2=$(mktemp -d)
python3 - "$GPT2" "$TOKENIZER" <<'PY'
import sys
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2Model
from sae_dist.config import ModelConfig
from sae_dist.data import load_lm
folder, tokenizer_dir = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else load_lm(ModelConfig(name="minilm-bundled"))[1]
torch.manual_seed(0)
config = GPT2Config(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
GPT2Model(config).save_pretrained(folder)
tokenizer.save_pretrained(folder)
PY

part cuda_tests 100 python3 -m pytest tests/train/test_cuda.py -q -p no:cacheprovider
part step_65k 60 python3 benchmarks/bench_step.py --device cuda --latents 65536 --experts 1 8 --bf16-state --profile 25  # N = 8: the target's
part lm 90 python3 benchmarks/bench_lm.py --device cuda
part job 60 python3 launch/train.py +experiment=switch_65k model.path="$GPT2" data=python_docs trainer.device=cuda \
  trainer.steps=300 trainer.log_every=25 trainer.checkpoint_every=100000 trainer.out_dir="$GPT2/job" \
  trainer.progress=false trainer.profile_steps=10
cp "$GPT2/job/metrics.jsonl" "$LOG/job_metrics.jsonl" 2>/dev/null
cp "$GPT2"/job/profile/*.txt "$LOG/" 2>/dev/null  # the profiled window's operators and the GPU's busy fraction
part step_1m 90 python3 benchmarks/bench_step.py --device cuda --latents 1048576 --experts 1 32 --reference-repeats 0 --bf16-state \
  --profile 20
part topk 60 python3 benchmarks/bench_topk.py --device cuda
part job_lm_compiled 90 python3 launch/train.py +experiment=switch_65k model.path="$GPT2" model.compile=true \
  data=python_docs trainer.device=cuda trainer.steps=400 trainer.log_every=25 trainer.checkpoint_every=100000 \
  trainer.out_dir="$GPT2/job_lm_compiled" trainer.progress=false
cp "$GPT2/job_lm_compiled/metrics.jsonl" "$LOG/job_lm_compiled_metrics.jsonl" 2>/dev/null
part job_pretokenized 60 python3 launch/train.py +experiment=switch_65k model.path="$GPT2" data=python_docs \
  data.pretokenize=true trainer.device=cuda trainer.steps=300 trainer.log_every=25 trainer.checkpoint_every=100000 \
  trainer.out_dir="$GPT2/job_pretokenized" trainer.progress=false
cp "$GPT2/job_pretokenized/metrics.jsonl" "$LOG/job_pretokenized_metrics.jsonl" 2>/dev/null
part data 80 python3 benchmarks/bench_data.py --lm gpt2 "${TOKENIZER_ARGS[@]}" --device cuda --batch 8192 \
  --lm-batch 256 --buffer 65536 --steps 60 --log-every 10
part optimizer 40 python3 benchmarks/bench_optimizer.py --device cuda
part step_262k 40 python3 benchmarks/bench_step.py --device cuda --latents 262144
if command -v py-spy >/dev/null && wanted job_gil_profile; then  # which thread holds the GIL, and where, in the live job's steady state
  echo "=== job_gil_profile (at $(($(date +%s) - T0))s)"
  python3 launch/train.py +experiment=switch_65k model.path="$GPT2" data=python_docs trainer.device=cuda \
    trainer.steps=100000 trainer.log_every=25 trainer.out_dir="$GPT2/job_profiled" trainer.progress=false \
    >"$PARTS/job_profiled.log" 2>&1 &
  job=$!
  sleep 45  # past the start-up (imports, the model, the tokenising processes, compilation)
  timeout 40 py-spy record --pid "$job" --duration 15 --format raw --threads --gil --rate 200 -o "$PARTS/job_gil.txt" \
    >/dev/null 2>&1
  kill "$job" 2>/dev/null  # SIGTERM: the run checkpoints and stops
  wait "$job" 2>/dev/null
  python3 benchmarks/stack_profile.py "$PARTS/job_gil.txt" --top 10 >"$PARTS/job_gil_summary.log" 2>&1
  cat "$PARTS/job_gil_summary.log" >>"$LOG/all.log"
fi
echo "=== done at $(($(date +%s) - T0))s"
for name in cuda_tests step_65k lm step_1m topk optimizer data step_262k job_gil_summary; do
  echo "##### $name"
  if [ "$name" = job_gil_summary ]; then tail -c 4000 "$PARTS/$name.log" 2>/dev/null; continue; fi
  grep -h "│\|passed\|failed\|Error" "$PARTS/$name.log" 2>/dev/null | tail -c 2500
done
for job in job job_pretokenized job_lm_compiled; do
  echo "##### $job: tokens/s per metrics window"
  python3 -c "import json, sys; print([round(json.loads(l)['tokens_per_s']) for l in open(sys.argv[1])])" \
    "$LOG/${job}_metrics.jsonl" 2>/dev/null
done
