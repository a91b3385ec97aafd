#!/usr/bin/env bash
# Run a grid of experiments on this machine, several at a time: densities x inits x growths x
# seeds for one entry script, one run directory per point.
#
#   scripts/sweep.sh [-j N] [--per-gpu K] [--densities 0.2,0.1,0.05] [--growths random,unfired,momentum,gradient]
#                    [--inits ERK,uniform] [--seeds 0,1,2] [--out DIR] [--retry-failed] [--dry-run]
#                    -- cifar100.py [flags for every run]
#
# Run it again to pick up where it stopped: points whose results.json is complete are skipped,
# every other point runs with --resume (continuing an unfinished run from its last checkpoint).
# See scripts/grid_lib.sh for the grid, the point names and the commands; --help for the options.
set -euo pipefail
GRID_PROG=sweep.sh
# shellcheck source=scripts/grid_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/grid_lib.sh"

POLL_SECONDS=0.5  # how often to look for finished runs

usage() {
  cat <<EOF
usage: scripts/sweep.sh [-j N] [--per-gpu K] [grid options] [--dry-run] -- SCRIPT [flags for every run]

Runs SCRIPT (cifar100.py or miniImageNet100.py) once per point of the grid densities x inits x
growths x seeds, up to N runs at a time, each in OUT/<init>_<growth>_d<density>_s<seed> with its
console output appended to OUT/logs/<same name>.log. Finished points are skipped, unfinished ones
resumed. Ends with a summary; the exit code is 1 if a run failed, 3 if none failed but one was
stopped by a signal (saved: run the sweep again to resume it), 2 for a usage mistake.

  -j N               runs at a time (env JOBS; default: K per visible GPU, see --per-gpu; 1
                     without GPUs). GPUs: the list in CUDA_VISIBLE_DEVICES if set, else those
                     nvidia-smi -L lists. Slot s (0 <= s < N) runs on GPU number s mod (number of
                     GPUs), pinned with CUDA_VISIBLE_DEVICES
  --per-gpu K        runs at a time on each GPU (env PER_GPU; default 1): the default of -j is
                     K x (number of GPUs). An explicit -j N (or JOBS) wins: N at a time, spread
                     over the GPUs as above, so a GPU holds N/(number of GPUs) runs, rounded up,
                     whatever K. K > 1 without a visible GPU is refused (nothing to pack; use -j
                     for runs at a time on the CPU; CUDA_VISIBLE_DEVICES=0,1 with --dry-run
                     previews a GPU machine)
$GRID_OPTIONS_HELP
  --dry-run          print the runs at a time, each slot's GPU, each point's state and command;
                     run nothing
  -h, --help         this help

The interpreter is \$PYTHON, else python (else python3) on PATH.
examples: scripts/sweep.sh -j 2 --densities 0.2,0.1 --seeds 0,1 -- cifar100.py --num_tasks 10 \\
           --num_classes 100 --num_classes_per_task 10 --epochs 100 --update_frequency 400
          scripts/sweep.sh --per-gpu 3 --seeds 0,1,2 -- cifar100.py --num_tasks 10 (3 per GPU)
EOF
}

# The GPU ids runs may use, one per line: CUDA_VISIBLE_DEVICES if set (even empty), else
# nvidia-smi's list; nothing on a machine without GPUs.
visible_gpus() {
  local ids id
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
    for id in "${ids[@]}"; do
      if [[ -n $id && $id != -* ]]; then echo "$id"; fi
    done
  elif command -v nvidia-smi >/dev/null; then
    nvidia-smi -L 2>/dev/null | sed -n 's/^GPU \([0-9][0-9]*\):.*/\1/p'
  fi
}

format_seconds() {
  printf '%d:%02d:%02d' $(($1 / 3600)) $(($1 / 60 % 60)) $(($1 % 60))
}

# This script's own options for grid_parse_args: -j N into JOBS, --per-gpu K into PER_GPU.
take_script_option() {
  case $1 in
    -j | --jobs | --per-gpu)
      (($# >= 2)) || grid_die "$1 needs a value"
      if [[ $1 == --per-gpu ]]; then PER_GPU=$2; else JOBS=$2; fi
      GRID_SHIFT=2
      ;;
    -j?*) JOBS=${1#-j} GRID_SHIFT=1 ;;
    *) return 1 ;;
  esac
}

# Check PER_GPU and JOBS against the GPUs and default JOBS to PER_GPU x (number of GPUs).
choose_runs_at_a_time() {
  [[ $PER_GPU =~ ^[1-9][0-9]*$ ]] || grid_die "--per-gpu needs a whole number of runs per GPU >= 1, got '$PER_GPU'"
  ((${#GPUS[@]} > 0 || PER_GPU == 1)) || grid_die "--per-gpu $PER_GPU: no GPU is visible" \
    "(CUDA_VISIBLE_DEVICES, nvidia-smi -L), so there is nothing to pack; use -j N for runs at a time"
  if [[ -z $JOBS ]]; then JOBS=$((${#GPUS[@]} > 0 ? PER_GPU * ${#GPUS[@]} : 1)); fi
  [[ $JOBS =~ ^[1-9][0-9]*$ ]] || grid_die "-j needs a positive number of runs at a time, got '$JOBS'"
}

# One line naming the slots of each GPU, e.g. "4 runs at a time: slots 0,2 on GPU 0, slots 1,3
# on GPU 1"; nothing without GPUs (the header says "no GPU").
describe_slots() {
  local n_gpus=${#GPUS[@]} gpu slot slots line=""
  ((n_gpus)) || return 0
  for ((gpu = 0; gpu < n_gpus && gpu < JOBS; gpu++)); do
    slots=""
    for ((slot = gpu; slot < JOBS; slot += n_gpus)); do slots+="${slots:+,}$slot"; done
    if [[ $slots == *,* ]]; then slots="slots $slots"; else slots="slot $slots"; fi
    line+="${line:+, }$slots on GPU ${GPUS[gpu]}"
  done
  if ((JOBS == 1)); then echo "1 run at a time: $line"; else echo "$JOBS runs at a time: $line"; fi
}

# ---- running points, several at a time ----------------------------------------------------
# Slot s (0 <= s < JOBS) holds at most one run: SLOT_PID[s], SLOT_NAME[s], SLOT_LOG[s],
# SLOT_START[s]. With GPUs, slot s always uses GPU number s mod (number of GPUs).

declare -a SLOT_PID=() SLOT_NAME=() SLOT_LOG=() SLOT_START=()
declare -a SUCCEEDED=() FAILED=() SKIPPED=() STOPPED=()

say() { echo "$@"; }

# Start the selected point (state $2) in slot $1, in the background.
launch() {
  local slot=$1 state=$2 where=""
  local -a pin=()
  if ((${#GPUS[@]})); then
    pin=(env "CUDA_VISIBLE_DEVICES=${GPUS[slot % ${#GPUS[@]}]}")
    where=" on GPU ${GPUS[slot % ${#GPUS[@]}]}"
  fi
  grid_point_command "$state"
  grid_start_log
  "${pin[@]}" "${POINT_COMMAND[@]}" >>"$POINT_LOG" 2>&1 </dev/null &
  SLOT_PID[slot]=$!
  SLOT_NAME[slot]=$POINT_NAME
  SLOT_LOG[slot]=$POINT_LOG
  SLOT_START[slot]=$SECONDS
  local verb=start
  if [[ $state == unfinished ]]; then verb=resume; elif [[ $state == failed ]]; then verb=retry; fi
  say "$PROGRESS $(printf '%-8s' "$verb") $POINT_NAME$where (log: $POINT_LOG)"
}

# Collect the runs that ended: their exit codes into SUCCEEDED / FAILED, their slots freed.
reap_finished() {
  local slot status elapsed
  for slot in "${!SLOT_PID[@]}"; do
    if kill -0 "${SLOT_PID[slot]}" 2>/dev/null; then continue; fi
    status=0
    wait "${SLOT_PID[slot]}" || status=$?
    elapsed=$(format_seconds $((SECONDS - SLOT_START[slot])))
    if ((status == 0)); then
      SUCCEEDED+=("${SLOT_NAME[slot]}")
      say "      done     ${SLOT_NAME[slot]} in $elapsed"
    elif ((status == 3)); then  # stopped by a signal after saving: the next sweep resumes it
      STOPPED+=("${SLOT_NAME[slot]}")
      say "      stopped  ${SLOT_NAME[slot]} after $elapsed (saved; the next sweep resumes it)"
    else
      FAILED+=("${SLOT_NAME[slot]} (exit $status, log: ${SLOT_LOG[slot]})")
      say "      FAILED   ${SLOT_NAME[slot]} after $elapsed (exit $status, log: ${SLOT_LOG[slot]})"
    fi
    unset "SLOT_PID[slot]"
  done
}

# Wait until a slot is free; its number goes to FREE_SLOT.
wait_for_free_slot() {
  local slot
  while true; do
    reap_finished
    for ((slot = 0; slot < JOBS; slot++)); do
      if [[ -z ${SLOT_PID[slot]:-} ]]; then
        FREE_SLOT=$slot
        return 0
      fi
    done
    sleep "$POLL_SECONDS"
  done
}

wait_for_all() {
  while true; do
    reap_finished
    if ((${#SLOT_PID[@]} == 0)); then return 0; fi
    sleep "$POLL_SECONDS"
  done
}

# Ctrl-C or kill: stop the running runs (their checkpoints stay; the next sweep resumes them).
on_interrupt() {
  trap - INT TERM
  local slot stopped=()
  reap_finished
  for slot in "${!SLOT_PID[@]}"; do
    kill -TERM "${SLOT_PID[slot]}" 2>/dev/null || true
    stopped+=("${SLOT_NAME[slot]}")
  done
  wait || true
  summarize
  say "$GRID_PROG: interrupted: stopped ${#stopped[@]} run(s) (${stopped[*]}) and started no more;" \
    "run the same command again to resume"
  exit 130
}

summarize() {
  local entry
  say "$GRID_PROG: $TOTAL points in $GRID_OUT: ${#SUCCEEDED[@]} succeeded, ${#FAILED[@]} failed," \
    "${#SKIPPED[@]} skipped (already complete)"
  for entry in "${FAILED[@]}"; do say "failed: $entry"; done
  for entry in "${STOPPED[@]}"; do say "stopped by a signal, saved: $entry (run the sweep again to resume it)"; done
}

# ---- main ------------------------------------------------------------------------------------

JOBS=${JOBS:-}
PER_GPU=${PER_GPU:-1}
DRY_RUN=0
grid_parse_args "$@"
grid_setup "${RUN_ARGS[@]}"
mapfile -t GPUS < <(visible_gpus)
choose_runs_at_a_time
TOTAL=$(grid_size)
if ((DRY_RUN)); then grid_check_flags; else grid_check_flags --record; fi

if ((${#GPUS[@]})); then device="GPUs $(IFS=, && echo "${GPUS[*]}")"; else device="no GPU"; fi
say "$GRID_PROG: $(grid_describe); $JOBS at a time, $device"
describe_slots
trap on_interrupt INT TERM

for ((index = 0; index < TOTAL; index++)); do
  grid_point "$index"
  state=$(grid_point_state)
  PROGRESS="[$((index + 1))/$TOTAL]"
  if ((DRY_RUN)); then
    grid_point_command "$state"
    say "$PROGRESS $(printf '%-10s' "$state") $POINT_NAME: $(grid_quote "${POINT_COMMAND[@]}")"
  elif [[ $state == complete ]]; then
    SKIPPED+=("$POINT_NAME")
    say "$PROGRESS skip     $POINT_NAME (complete)"
  elif ! grid_point_wanted "$state"; then
    FAILED+=("$POINT_NAME (its results.json says the run stopped early; --retry-failed runs it again)")
    say "$PROGRESS FAILED   $POINT_NAME: stopped early in an earlier sweep (--retry-failed runs it again)"
  else
    wait_for_free_slot
    launch "$FREE_SLOT" "$state"
  fi
done
((DRY_RUN)) && exit 0
wait_for_all
summarize
((${#FAILED[@]} == 0)) || exit 1
((${#STOPPED[@]} == 0)) || exit 3
