#!/usr/bin/env bash
# The GPU check: one prepared command that, on a machine with one GPU, runs in under 8 minutes:
#   1. tests:      python -m pytest -q -k cuda tests/          (the CUDA cases of the test suite)
#   2. benchmarks: python -m benchmarks --device cuda --json   (every figure, on stand-in data)
#   3. learning:   a short 3-task CIFAR-100 run on real images (gpu_check_data/, see --prepare)
# and writes gpu_check.json and gpu_check.md into --out. Every section has its own time limit; a
# failing or timed-out section does not stop the others; the exit code is 1 if any failed.
#
#   scripts/gpu_check.sh --prepare [--data_dir ../shared/data]   # beforehand, where the data is
#   scripts/gpu_check.sh --out DIR                                # on the GPU machine, offline
#   scripts/gpu_check.sh --dry --out DIR                          # the same on a CPU, tiny sizes
#
# Needs only a Python with torch, torchvision, numpy, pillow and tqdm ($PYTHON, else python, else
# python3) and the repository with gpu_check_data/ (about 28 MB; git-ignored, made by --prepare).
set -u
cd "$(dirname "$0")/.." || exit 2

PYTHON=${PYTHON:-$(command -v python || command -v python3 || true)}
OUT=gpu_check_out
DATA_DIR=../shared/data
CHECK_DATA=gpu_check_data
DRY=0
PREPARE=0

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
fail() { echo "error: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || fail "--out needs a folder"; OUT=$2; shift 2 ;;
        --data_dir) [ $# -ge 2 ] || fail "--data_dir needs a folder"; DATA_DIR=$2; shift 2 ;;
        --check_data) [ $# -ge 2 ] || fail "--check_data needs a folder"; CHECK_DATA=$2; shift 2 ;;
        --dry) DRY=1; shift ;;
        --prepare) PREPARE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) fail "unknown argument $1 (see scripts/gpu_check.sh --help)" ;;
    esac
done
[ -n "$PYTHON" ] || fail "no python on PATH; set PYTHON=/path/to/python"
command -v timeout >/dev/null || fail "needs coreutils' timeout"

if [ "$PREPARE" = 1 ]; then
    exec "$PYTHON" -m benchmarks.gpu_check prepare --data_dir "$DATA_DIR" --into "$CHECK_DATA"
fi

mkdir -p "$OUT" || fail "cannot create --out $OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/sections.tsv"
rm -rf "$OUT/learning" "$OUT/benchmarks.json" "$OUT/gpu_check.json" "$OUT/gpu_check.md"

# run_section NAME LIMIT_SECONDS COMMAND...: its output on the terminal and in $OUT/NAME.log, and
# a line "name, exit code, seconds, limit" in sections.tsv (exit code 124: timed out).
run_section() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local start ms code
    start=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    code=${PIPESTATUS[0]}
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    printf '%s\t%s\t%d.%03d\t%s\n' "$name" "$code" $((ms / 1000)) $((ms % 1000)) "$limit" >> "$OUT/sections.tsv"
    echo "== $name: exit code $code"
}

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    TEST_LIMIT=120; BENCH_LIMIT=120; LEARN_LIMIT=120
    # the sync counting's plumbing only: every family is tested by tests/test_benchmarks.py
    BENCH_ARGS=(--quick --only syncs)
    LEARN_ARGS=(--num_tasks 2 --num_classes 20 --epochs 1 --max_batches 1 --batch_size 8 --test_batch_size 100)
else
    DEVICE=cuda
    TEST_LIMIT=120; BENCH_LIMIT=260; LEARN_LIMIT=60  # 440 s, 8 min with the grace periods
    BENCH_ARGS=()
    LEARN_ARGS=(--num_tasks 3 --num_classes 30 --epochs 5)
fi

run_section tests "$TEST_LIMIT" "$PYTHON" -m pytest -q -p no:cacheprovider -k cuda tests/
# no --data_dir with CIFAR-100 in it: the benchmarks generate stand-in images in its format
run_section benchmarks "$BENCH_LIMIT" "$PYTHON" -m benchmarks --device "$DEVICE" --data_dir "$OUT/standin-data" \
    --json "$OUT/benchmarks.json" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}
run_section learning "$LEARN_LIMIT" "$PYTHON" cifar100.py --data_dir "$CHECK_DATA" --no-download \
    --num_classes_per_task 10 --sparse_init ERK --growth random --density 0.2 --update_frequency 20 \
    --device "$DEVICE" --output_dir "$OUT/learning" --checkpoint_every 0 ${LEARN_ARGS[@]+"${LEARN_ARGS[@]}"}

echo "== summary"
"$PYTHON" -m benchmarks.gpu_check summarize --out "$OUT" $([ "$DRY" = 1 ] && echo --dry)
