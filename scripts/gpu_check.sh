#!/usr/bin/env bash
# The GPU check: one prepared command that, on a machine with one GPU, runs in under 10 minutes:
#   1. tests:      python -m pytest -v -k cuda tests/          (the CUDA cases of the test suite)
#   2. benchmarks: python -m benchmarks --device cuda --json   (every figure, on stand-in data)
#   3. learning:   a short 3-task CIFAR-100 run on real images (gpu_check_data/, see --prepare)
# and writes gpu_check.json and gpu_check.md into --out. Every section has its own time limit; a
# failing or timed-out section does not stop the others; the exit code is 1 if any failed. A
# timed-out section reports what it finished (tests passed, benchmark families, tasks trained).
#
#   scripts/gpu_check.sh --prepare [--data_dir ../shared/data]   # beforehand, where the data is
#   scripts/gpu_check.sh --out DIR                                # on the GPU machine, offline
#   scripts/gpu_check.sh --dry --out DIR                          # the same on a CPU, tiny sizes
#
# --dry needs no preparation: without gpu_check_data/ it makes a tiny stand-in data set in DIR.
# Time limits in seconds, each adjustable (defaults: GPU 150/270/120; --dry 300 each):
#   --limit-tests S  --limit-benchmarks S  --limit-learning S
# Ctrl-C or SIGTERM stops the running section (and everything it started) and the check.
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
TEST_LIMIT=; BENCH_LIMIT=; LEARN_LIMIT=

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
fail() { echo "error: $*" >&2; exit 2; }
seconds() {  # seconds FLAG VALUE: VALUE if it is a whole number of seconds > 0
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || fail "$1 needs a whole number of seconds > 0, not '$2'"
    echo "$2"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || fail "--out needs a folder"; OUT=$2; shift 2 ;;
        --data_dir) [ $# -ge 2 ] || fail "--data_dir needs a folder"; DATA_DIR=$2; shift 2 ;;
        --check_data) [ $# -ge 2 ] || fail "--check_data needs a folder"; CHECK_DATA=$2; shift 2 ;;
        --limit-tests) [ $# -ge 2 ] || fail "--limit-tests needs seconds"; TEST_LIMIT=$(seconds "$1" "$2") || exit 2; shift 2 ;;
        --limit-benchmarks) [ $# -ge 2 ] || fail "--limit-benchmarks needs seconds"; BENCH_LIMIT=$(seconds "$1" "$2") || exit 2; shift 2 ;;
        --limit-learning) [ $# -ge 2 ] || fail "--limit-learning needs seconds"; LEARN_LIMIT=$(seconds "$1" "$2") || exit 2; shift 2 ;;
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

if [ "$DRY" = 0 ] && [ ! -f "$CHECK_DATA/cifar-100-python/train" ]; then
    fail "no $CHECK_DATA/cifar-100-python: run scripts/gpu_check.sh --prepare first (where ../shared/data is)"
fi
mkdir -p "$OUT" || fail "cannot create --out $OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/sections.tsv"
rm -rf "$OUT/learning" "$OUT/benchmarks.json" "$OUT/gpu_check.json" "$OUT/gpu_check.md"
export PYTHONUNBUFFERED=1  # the logs fill as the sections go (a timed-out section's log says how far it got)

# run_section NAME LIMIT_SECONDS COMMAND...: its output on the terminal and in $OUT/NAME.log, and
# a line "name, exit code, seconds, limit" in sections.tsv (exit code 124: timed out). The section
# runs in the background, so that a stop signal reaches this script at once (see on_stop).
SECTION=
run_section() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local start ms code shown
    start=$(date +%s%N)
    : > "$OUT/$name.log"  # before tail reads it
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1 &
    SECTION=$!
    tail -n +1 -f --pid="$SECTION" "$OUT/$name.log" &
    shown=$!
    wait "$SECTION"
    code=$?
    wait "$shown"
    SECTION=
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    printf '%s\t%s\t%d.%03d\t%s\n' "$name" "$code" $((ms / 1000)) $((ms % 1000)) "$limit" >> "$OUT/sections.tsv"
    echo "== $name: exit code $code"
}

# on_stop NAME NUMBER: SIGINT or SIGTERM to the check: `timeout` passes SIGTERM on to the running
# section's process group (a learning run saves; pytest ends its subprocesses), then the check ends.
on_stop() {
    echo "== stopped by SIG$1: ending the running section" >&2
    if [ -n "$SECTION" ]; then
        kill -TERM "$SECTION" 2>/dev/null
        wait "$SECTION"
    fi
    exit $((128 + $2))
}
trap 'on_stop INT 2' INT
trap 'on_stop TERM 15' TERM

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    # measured on a 2-core CPU at load average 9-12: 24 / 25 / 97 s (README); 300 s: 3x the slowest
    TEST_LIMIT=${TEST_LIMIT:-300}; BENCH_LIMIT=${BENCH_LIMIT:-300}; LEARN_LIMIT=${LEARN_LIMIT:-300}
    # the sync counting's plumbing only: every family is tested by tests/test_benchmarks.py
    BENCH_ARGS=(--quick --only syncs)
    LEARN_ARGS=(--num_tasks 2 --num_classes 20 --epochs 1 --max_batches 1 --batch_size 8 --test_batch_size 100)
    if [ ! -f "$CHECK_DATA/cifar-100-python/train" ]; then
        CHECK_DATA=$OUT/standin-check-data  # a plumbing check: random images in CIFAR-100's layout will do
        rm -rf "$CHECK_DATA"
        echo "== no gpu_check_data: a tiny stand-in (random images) in $CHECK_DATA"
        "$PYTHON" -m benchmarks.gpu_check standin --into "$CHECK_DATA" || fail "could not write the stand-in data"
    fi
else
    DEVICE=cuda
    # NOT measured on a GPU (none was available): bounds with room, whose sum (540 s, 570 s with the
    # grace periods) keeps the whole check under 10 minutes; set them with the --limit-* flags
    TEST_LIMIT=${TEST_LIMIT:-150}; BENCH_LIMIT=${BENCH_LIMIT:-270}; LEARN_LIMIT=${LEARN_LIMIT:-120}
    BENCH_ARGS=()
    LEARN_ARGS=(--num_tasks 3 --num_classes 30 --epochs 5)
fi

# -v: one line per test as it ends, so a timed-out section still says which passed
run_section tests "$TEST_LIMIT" "$PYTHON" -m pytest -v -p no:cacheprovider -k cuda tests/
# no --data_dir with CIFAR-100 in it: the benchmarks generate stand-in images in its format
run_section benchmarks "$BENCH_LIMIT" "$PYTHON" -m benchmarks --device "$DEVICE" --data_dir "$OUT/standin-data" \
    --json "$OUT/benchmarks.json" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}
run_section learning "$LEARN_LIMIT" "$PYTHON" cifar100.py --data_dir "$CHECK_DATA" --no-download \
    --num_classes_per_task 10 --sparse_init ERK --growth random --density 0.2 --update_frequency 20 \
    --task_inference confidence --device "$DEVICE" --output_dir "$OUT/learning" --checkpoint_every 0 ${LEARN_ARGS[@]+"${LEARN_ARGS[@]}"}

echo "== summary"
"$PYTHON" -m benchmarks.gpu_check summarize --out "$OUT" $([ "$DRY" = 1 ] && echo --dry)
