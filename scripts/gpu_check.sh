#!/usr/bin/env bash
# The one-command GPU check: CUDA tests, l2e-bench (pythia-160m / 410m, bf16, seq 2048, none / l2e / memel,
# eager and train.compile) and a short real l2e-pretrain through the deepspeed launcher (160m shape, bf16, L2E).
# Writes OUT_DIR/gpu_check.json (one record per step + the benchmark figures + the run's losses) and
# OUT_DIR/gpu_check.log (everything the steps printed). Budget: <= 8 minutes on one H100/H200.
#
#   scripts/gpu_check.sh OUT_DIR                # on a GPU machine, from the repository root
#   scripts/gpu_check.sh OUT_DIR --cpu-smoke    # tiny shapes, fp32, on CPU: the plumbing (tests/test_gpu_check.py)
#
# Exit code: 0 when every step passed, 1 when one failed (the JSON says which), 2 on a usage error.
set -u -o pipefail

usage() { echo "usage: scripts/gpu_check.sh OUT_DIR [--cpu-smoke]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
OUT=$1
MODE=gpu
if [[ $# -eq 2 ]]; then [[ $2 == --cpu-smoke ]] || usage; MODE=cpu-smoke; fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
mkdir -p "$OUT" || { echo "gpu_check: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
STEPS="$OUT/steps.tsv"
: > "$LOG"
: > "$STEPS"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHON=${PYTHON:-python}

if [[ $MODE == gpu ]]; then
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False): run on a GPU node, or pass --cpu-smoke" >&2
        exit 2
    fi
    DEVICE=cuda
    BENCH_SHAPE=(--seq-length 2048 --rounds 8 --warmup 2 --batches 2)
    BENCH_MODELS=("pythia-160m:8" "pythia-410m:4")   # config:micro-batch size
    BENCH_COMPILE=(false true)
    PRETRAIN=(--config configs/pythia-160m.yaml --config configs/l2e/l2e.yaml
              --set train.seq_length=1024 --set train.micro_batch_size=8 --set train.global_batch_size=16
              --set train.train_iters=40 --set optimizer.lr=6e-4 --set deepspeed.precision=bf16)
    PYTEST_ARGS=(-m gpu tests/test_gpu.py)
    # Per-step limits that add up to the 8-minute budget: a step over its limit is recorded (rc 124) and the
    # check goes on, so the whole command always ends within 8 minutes with a complete JSON.
    LIMIT_TESTS=120; LIMIT_PRETRAIN=90
    declare -A LIMIT_BENCH_OF=([pythia-160m:false]=50 [pythia-160m:true]=70 [pythia-410m:false]=60 [pythia-410m:true]=80)
else
    DEVICE=cpu
    BENCH_SHAPE=(--seq-length 32 --rounds 2 --warmup 1 --batches 1 --no-memory-probe
                 --set model.num_layers=2 --set model.hidden_size=64 --set model.num_attention_heads=4)
    BENCH_MODELS=("tiny:2")
    BENCH_COMPILE=(false)
    PRETRAIN=(--config configs/tiny.yaml --config configs/l2e/l2e.yaml
              --set model.num_layers=2 --set model.hidden_size=64 --set model.max_position_embeddings=32
              --set train.seq_length=32 --set train.micro_batch_size=2 --set train.global_batch_size=4
              --set train.train_iters=12 --set optimizer.lr=3e-3 --set l2e.late_start=4)
    PYTEST_ARGS=(-m gpu tests/test_gpu.py)   # collected and skipped without CUDA: the step still runs
    unset L2E_NO_SKIPS                       # (the suite's no-skip rule is for the suite, not this smoke step)
    LIMIT_TESTS=300; LIMIT_PRETRAIN=300
    declare -A LIMIT_BENCH_OF=([tiny:false]=300)
fi

# step NAME LIMIT_S COMMAND...: runs it under `timeout`, appends its output to the log and a row to steps.tsv.
step() {
    local name=$1 limit=$2; shift 2
    echo "=== $name: $*" >> "$LOG"
    local start; start=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    local secs; secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\n' "$name" "$rc" "$secs" >> "$STEPS"
    echo "gpu_check: $name rc=$rc (${secs}s)"
}

step cuda_tests "$LIMIT_TESTS" "$PYTHON" -m pytest -q -p no:cacheprovider -rs "${PYTEST_ARGS[@]}" \
    --junitxml "$OUT/cuda_tests.xml"

for entry in "${BENCH_MODELS[@]}"; do
    model=${entry%%:*}; micro=${entry##*:}
    for compile in "${BENCH_COMPILE[@]}"; do
        tag="bench_${model}_compile-${compile}"
        step "$tag" "${LIMIT_BENCH_OF[$model:$compile]}" "$PYTHON" -m launcher.bench --config "configs/$model.yaml" "${BENCH_SHAPE[@]}" \
            --micro-batch-size "$micro" --variants none l2e memel --set "train.compile=$compile" \
            --out "$OUT/$tag.json"
    done
done

step pretrain "$LIMIT_PRETRAIN" deepspeed --num_gpus 1 --master_port "${GPU_CHECK_PORT:-29517}" \
    --module launcher.pretrain "${PRETRAIN[@]}" \
    --set data.paths=[] --set data.tokenizer=null --set "data.cache_dir=$OUT/data" --set "train.output_dir=$OUT/pretrain" \
    --set train.log_interval=2 --set train.eval_interval=0 --set train.save_interval=0 \
    --set logging.progress_bar=false --set logging.tensorboard=false --set "parallel.device=$DEVICE"

"$PYTHON" "$ROOT/scripts/gpu_check_report.py" "$OUT" "$MODE"
