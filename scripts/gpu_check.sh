#!/usr/bin/env bash
# The one-command GPU check, for the GPU machine as it is (Python 3.12, torch 2.11+, no package index):
# installs the carried wheels (scripts/gpu_wheels.sh filled gpu-wheels/ beforehand) offline into WORK/site,
# then runs, each step with its own time limit and its own result file written as soon as it ends:
#   install   pip install --no-index of gpu-wheels/*.whl into WORK/site (the image's torch is used)
#   steps     ONE process: versions (env.json), NCCL world of 1 + the L2E reduction over it (nccl.json), bf16
#             logits vs transformers (logits.json)
#   bench_*   l2e-bench pythia-410m bf16 seq 2048 per named case (eager, compile with its own budget and
#             inductor cache): tokens/s, MFU, L2E overhead (bench_<case>.json)
#   pretrain  a short l2e-pretrain through the deepspeed launcher (NCCL, bf16, L2E on, 4-step warm-up)
#   cuda_tests  pytest -m gpu tests/test_gpu.py (last: the slowest per finding)
# then OUT_DIR/gpu_check.json: every step, and each target measured against its goal. Budget: 7 minutes.
#
#   scripts/gpu_check.sh OUT_DIR                # on the GPU machine, from the repository root
#   scripts/gpu_check.sh OUT_DIR --cpu-smoke    # tiny shapes, fp32, on CPU: the plumbing (tests/test_gpu_check.py)
#
# Environment: PYTHON (default python3), GPU_CHECK_WORK (scratch, default OUT_DIR/work), GPU_WHEELS (default ./gpu-wheels; absent or empty: use the installed
# environment), GPU_CHECK_BENCH_CASES (default "eager compile"; add a case by name in BENCH_CASE_SETS below).
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
# Scratch (installed wheels, corpus, the pretrain run, the inductor cache, the step table, the junit XML) apart
# from the results, so OUT holds only the few files worth returning (gpu_check.log, gpu_check.json and one
# JSON per step): on the device machine pass GPU_CHECK_WORK=/tmp/... and OUT=$OUT (at most 8 files come back).
WORK=${GPU_CHECK_WORK:-$OUT/work}
mkdir -p "$WORK" || { echo "gpu_check: cannot create $WORK" >&2; exit 2; }
WORK=$(cd "$WORK" && pwd)
LOG="$OUT/gpu_check.log"
STEPS="$WORK/steps.tsv"
: > "$LOG"
: > "$STEPS"
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-$ROOT/gpu-wheels}
SITE="$WORK/site"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
CHECK_START=$(date +%s)
# The whole check ends within BUDGET_S: each step gets its own limit or what is left, whichever is less.
BUDGET_S=${GPU_CHECK_BUDGET_S:-400}
export PY WHEELS SITE

# step NAME LIMIT_S COMMAND...: runs it under `timeout`, appends its output to the log and a row to steps.tsv.
step() {
    local name=$1 limit=$2; shift 2
    local left=$((CHECK_START + BUDGET_S - $(date +%s)))
    if ((left < 5)); then
        printf '%s\t%s\t%s\n' "$name" 124 0 >> "$STEPS"
        echo "gpu_check: $name not started: the ${BUDGET_S}s budget is spent" | tee -a "$LOG"
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit}s): $*" >> "$LOG"
    local start; start=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    local secs; secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\n' "$name" "$rc" "$secs" >> "$STEPS"
    echo "gpu_check: $name rc=$rc (${secs}s)"
    # gpu_check.json after every step: a check killed from outside still leaves what it measured, summarised.
    "$PY" "$ROOT/scripts/gpu_check_report.py" "$OUT" "$MODE" "$WORK" --quiet >> "$LOG" 2>&1
}

# Bench cases by name: each is one l2e-bench process (its own peak memory) with these --set overrides.
# A new flag to measure (an attention backend, a fused loss) is one more entry here and a name in the list.
declare -A BENCH_CASE_SETS=([eager]="" [compile]="train.compile=true l2e.backend=compiled"
    [fused]="train.compile=true l2e.backend=compiled model.cross_entropy=fused model.attention_backend=flash")
read -ra BENCH_CASES <<<"${GPU_CHECK_BENCH_CASES:-$([[ $MODE == gpu ]] && echo "eager compile" || echo "eager")}"
for case in "${BENCH_CASES[@]}"; do
    [[ -v BENCH_CASE_SETS[$case] ]] || { echo "gpu_check: unknown bench case $case (known: ${!BENCH_CASE_SETS[*]})" >&2; exit 2; }
done
# The carried wheels, offline, into a target folder that shadows nothing of the image but what it lacks.
install_wheels() {
    local wheels=("$WHEELS"/*.whl)
    if [[ ! -e ${wheels[0]} ]]; then
        echo "gpu_check: no wheels in $WHEELS: using the installed environment"
        return 0
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
}
export -f install_wheels
step install 60 bash -c install_wheels
[[ -d $SITE ]] && export PYTHONPATH="$PYTHONPATH:$SITE"   # after the repo, before nothing of the image's own

if [[ $MODE == gpu ]]; then
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False): run on a GPU node, or pass --cpu-smoke" >&2
        exit 2
    fi
    DEVICE=cuda
    BENCH_CONFIG=configs/pythia-410m.yaml; BENCH_MICRO=4
    BENCH_SHAPE=(--seq-length 2048 --rounds 6 --warmup 2 --batches 2 --set deepspeed.precision=bf16)
    BENCH_VARIANTS=(none l2e)
    # The check's pretrain: the 160m shape, 40 steps, a 4-step warm-up (Pythia's 1% of 143000 would keep the
    # lr below 2e-5 throughout and show nothing) and a cosine over the 40 steps.
    PRETRAIN=(--config configs/pythia-160m.yaml --config configs/l2e/l2e.yaml
              --set train.seq_length=1024 --set train.micro_batch_size=8 --set train.global_batch_size=16
              --set train.train_iters=40 --set optimizer.lr=6e-4 --set deepspeed.precision=bf16
              --set optimizer.lr_decay_iters=40 --set optimizer.warmup_fraction=0.1
              --set optimizer.schedule=warmup_decay --set l2e.late_start=4)
    LIMIT_STEPS=75; LIMIT_PRETRAIN=120; LIMIT_TESTS=90
    declare -A LIMIT_BENCH_OF=([eager]=60 [compile]=100 [fused]=100)
else
    DEVICE=cpu
    BENCH_CONFIG=configs/tiny.yaml; BENCH_MICRO=2
    BENCH_SHAPE=(--seq-length 32 --rounds 2 --warmup 1 --batches 1 --no-memory-probe
                 --set model.num_layers=2 --set model.hidden_size=64 --set model.num_attention_heads=4)
    BENCH_VARIANTS=(none l2e memel)
    PRETRAIN=(--config configs/tiny.yaml --config configs/l2e/l2e.yaml
              --set model.num_layers=2 --set model.hidden_size=64 --set model.max_position_embeddings=32
              --set train.seq_length=32 --set train.micro_batch_size=2 --set train.global_batch_size=4
              --set train.train_iters=12 --set optimizer.lr=3e-3 --set l2e.late_start=4
              --set optimizer.lr_decay_iters=12 --set optimizer.warmup_fraction=0.25)
    unset L2E_NO_SKIPS                       # (the suite's no-skip rule is for the suite, not this smoke step)
    LIMIT_STEPS=300; LIMIT_PRETRAIN=300; LIMIT_TESTS=300
    BUDGET_S=${GPU_CHECK_BUDGET_S:-1400}   # a loaded 2-core CI machine
    declare -A LIMIT_BENCH_OF=([eager]=300 [compile]=600 [fused]=600)
fi
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-cache"   # the compile case's own cache, reported with it

# The pretrain step's corpus (stdlib docstrings, keyed by the Python version: it cannot be carried) is built on
# the CPU in the background while the GPU steps run; the pretrain step finds it (or waits on its lock).
"$PY" -c "import sys; from l2e_dist.data.default_corpus import prepare_default_corpus as p; p(sys.argv[1])" \
    "$WORK/data" > "$WORK/corpus.log" 2>&1 &
CORPUS_PID=$!
trap 'kill "$CORPUS_PID" 2>/dev/null' EXIT

step steps "$LIMIT_STEPS" "$PY" "$ROOT/scripts/gpu_check_steps.py" "$OUT" "$DEVICE"

for case in "${BENCH_CASES[@]}"; do
    sets=()
    for kv in ${BENCH_CASE_SETS[$case]}; do sets+=(--set "$kv"); done
    step "bench_$case" "${LIMIT_BENCH_OF[$case]:-120}" "$PY" -m launcher.bench --config "$BENCH_CONFIG" \
        "${BENCH_SHAPE[@]}" "${sets[@]}" --micro-batch-size "$BENCH_MICRO" --variants "${BENCH_VARIANTS[@]}" \
        --out "$OUT/bench_$case.json"
done

pretrain() {
    eval "$("$PY" -m launcher.gpu_env "$@")"   # as the sbatch scripts do: before CUDA and NCCL start
    "$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port "${GPU_CHECK_PORT:-29517}" \
        --module launcher.pretrain "$@"
}
export -f pretrain
step pretrain "$LIMIT_PRETRAIN" bash -c 'pretrain "$@"' pretrain "${PRETRAIN[@]}" \
    --set data.paths=[] --set data.tokenizer=null --set "data.cache_dir=$WORK/data" --set "train.output_dir=$WORK/pretrain" \
    --set train.log_interval=2 --set train.eval_interval=0 --set train.save_interval=0 \
    --set logging.progress_bar=false --set logging.tensorboard=false --set "parallel.device=$DEVICE"

# The logits test is the steps process's logits.json already: not paid twice.
step cuda_tests "$LIMIT_TESTS" "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu tests/test_gpu.py \
    -k "not test_bf16_logits_match_transformers_on_cuda" \
    --junitxml "$WORK/cuda_tests.xml"

echo "gpu_check: $(($(date +%s) - CHECK_START)) s in all" >> "$LOG"
"$PY" "$ROOT/scripts/gpu_check_report.py" "$OUT" "$MODE" "$WORK"
