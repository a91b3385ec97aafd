#!/usr/bin/env bash
# The grid of sweep.sh as one SLURM job array, one grid point per array task (or K with
# --per-gpu K, run at the same time on the task's one GPU).
#
#   scripts/sweep_slurm.sh [--partition P] [--gpus N] [--time T] [--cpus N] [--mem M]
#                          [--max-running M] [--signal-seconds S] [--per-gpu K]
#                          [--sbatch-arg ARG]... [grid options] [--dry-run]
#                          -- cifar100.py [flags for every run]
#
# Without SLURM_ARRAY_TASK_ID it submits itself with the same grid:
#     sbatch --array=0-<T-1> <resources> scripts/sweep_slurm.sh <grid options> -- <script and flags>
# with T = ceil(N/K) tasks for N points (--dry-run prints that command and the grid instead). As
# array task i (SLURM_ARRAY_TASK_ID=i, set by SLURM, or by hand to run it anywhere) it runs points
# iK .. iK+K-1 (point i when K = 1) exactly as sweep.sh would, all at the same time: nothing for a
# point whose results.json is complete, else with --resume, the run's output appended to
# OUT/logs/<point>.log. Submitting the same command again therefore finishes what a previous
# array left (timeouts, preemption, failures) and skips the rest.
#
# Time limits: each array task asks SLURM for SIGUSR1 S seconds (--signal-seconds, default 120)
# before its time limit, sent to this batch shell only (--signal=B:USR1@S): the run is not a job
# step of its own (no srun), so without B: nothing would reach it. The shell runs its points in
# the background and forwards the signal to every run; a run saves and exits with code 3 (stopped
# by a signal, resumable). Once all its runs ended, a task with a run stopped so requeues itself
# (scontrol requeue <job>_<index>, allowed by --requeue), so that it continues with --resume in a
# fresh allocation (its complete points skipped). A failed run fails the task all the same.
set -euo pipefail
GRID_PROG=sweep_slurm.sh
# As a SLURM job this file runs from a copy in SLURM's spool folder: the submission tells it
# where the project's scripts are.
SCRIPTS_DIR=${SWEEP_SCRIPTS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
# shellcheck source=scripts/grid_lib.sh
source "$SCRIPTS_DIR/grid_lib.sh"

usage() {
  cat <<EOF
usage: scripts/sweep_slurm.sh [resources] [grid options] [--dry-run] -- SCRIPT [flags for every run]

Submits the grid densities x inits x growths x seeds of SCRIPT as one SLURM job array (one
point per task, or K with --per-gpu K; run as by scripts/sweep.sh: complete points are skipped,
others run with --resume). With SLURM_ARRAY_TASK_ID set it runs that task's points instead.

resources (each also from the environment; unset ones are left to the cluster's defaults):
  --partition P      SLURM partition (env SWEEP_PARTITION)
  --gpus N           GPUs per array task, as --gres=gpu:N; 0 for none (env SWEEP_GPUS; default 1)
  --time T           time limit per array task, e.g. 24:00:00 (env SWEEP_TIME)
  --cpus N           CPUs per array task (env SWEEP_CPUS)
  --mem M            memory per array task, e.g. 16G (env SWEEP_MEM)
  --max-running M    at most M array tasks at once (env SWEEP_MAX_RUNNING)
  --signal-seconds S SIGUSR1 to each array task S seconds before its time limit: its runs save
                     and the task requeues itself to continue; 0: neither (env
                     SWEEP_SIGNAL_SECONDS; default 120)
  --per-gpu K        grid points per array task, run at the same time on its one GPU (env
                     PER_GPU; default 1): ceil(points / K) array tasks; task i runs points
                     iK .. iK+K-1. --cpus, --mem and --time are then for all K runs together.
                     K > 1 needs --gpus 1: a run uses one GPU, so K runs on a task with several
                     GPUs would all share its first (ask for more tasks instead); with --gpus 0
                     there is no GPU to pack
  --sbatch-arg ARG   any other sbatch option, e.g. --sbatch-arg=--account=abc (repeatable)
grid:
$GRID_OPTIONS_HELP
  --dry-run          print the sbatch command, the points of each array task (with
                     --per-gpu K > 1) and the grid, submit nothing
  -h, --help         this help
EOF
}

PARTITION=${SWEEP_PARTITION:-}
GPUS=${SWEEP_GPUS:-1}
TIME_LIMIT=${SWEEP_TIME:-}
CPUS=${SWEEP_CPUS:-}
MEMORY=${SWEEP_MEM:-}
MAX_RUNNING=${SWEEP_MAX_RUNNING:-}
# 120 s: after the signal a run finishes one optimizer step or one test batch, then saves
# (utils/stopping.py). Worst case measured on a 2-core CPU (AMD EPYC VM, torch 2.14, ResNet-18,
# default batch sizes): miniImageNet at 84 px, a step with a topology update 4.1 s or a one-shot
# task inference batch 4.4 s, plus the save of the task in progress (373 MB) 0.4 s; CIFAR-100
# 0.6 s + 0.3 s. With that machine 3x oversubscribed: 31 s + 1.9 s. 120 s leaves 3.5x over the
# worst figure, and a GPU is faster still (SLURM's SIGTERM at the limit is then ignored while the
# run saves; SIGKILL follows KillWait later, 30 s by default).
SIGNAL_SECONDS=${SWEEP_SIGNAL_SECONDS:-120}
EXTRA_SBATCH=()
DRY_RUN=0
STOPPED_BY_SIGNAL=3  # a run's exit code after it saved on a signal: continue it with --resume
PER_GPU=${PER_GPU:-1} # grid points per array task, run at the same time on its one GPU
# The runs of this array task: their processes, point indices, names and (once ended) exit codes.
declare -a RUN_PIDS=() RUN_INDICES=() RUN_NAMES=() RUN_STATUSES=()

# This script's own options for grid_parse_args: the SLURM resources.
take_script_option() {
  case $1 in
    --partition | --gpus | --time | --cpus | --mem | --max-running | --signal-seconds | --sbatch-arg | --per-gpu)
      (($# >= 2)) || grid_die "$1 needs a value"
      case $1 in
        --partition) PARTITION=$2 ;;
        --gpus) GPUS=$2 ;;
        --time) TIME_LIMIT=$2 ;;
        --cpus) CPUS=$2 ;;
        --mem) MEMORY=$2 ;;
        --max-running) MAX_RUNNING=$2 ;;
        --signal-seconds) SIGNAL_SECONDS=$2 ;;
        --sbatch-arg) EXTRA_SBATCH+=("$2") ;;
        --per-gpu) PER_GPU=$2 ;;
      esac
      GRID_SHIFT=2
      ;;
    *) return 1 ;;
  esac
}

# The resources must be numbers where sbatch wants numbers.
check_resources() {
  [[ $GPUS =~ ^[0-9]+$ ]] || grid_die "--gpus needs a number >= 0, got '$GPUS'"
  [[ $PER_GPU =~ ^[1-9][0-9]*$ ]] || grid_die "--per-gpu needs a whole number of runs per GPU >= 1, got '$PER_GPU'"
  ((PER_GPU == 1 || GPUS == 1)) || grid_die "--per-gpu $PER_GPU runs that many points at once on an array" \
    "task's one GPU: it needs --gpus 1, got --gpus $GPUS (a run uses one GPU; see --help)"
  [[ -z $CPUS || $CPUS =~ ^[1-9][0-9]*$ ]] || grid_die "--cpus needs a number >= 1, got '$CPUS'"
  [[ -z $MAX_RUNNING || $MAX_RUNNING =~ ^[1-9][0-9]*$ ]] ||
    grid_die "--max-running needs a number >= 1, got '$MAX_RUNNING'"
  if [[ ! $SIGNAL_SECONDS =~ ^[0-9]{1,5}$ ]] || ((10#$SIGNAL_SECONDS > 65535)); then
    grid_die "--signal-seconds needs a number of seconds from 0 to 65535 (SLURM's limit), got '$SIGNAL_SECONDS'"
  fi
  SIGNAL_SECONDS=$((10#$SIGNAL_SECONDS))
  local limit
  limit=$(slurm_time_seconds "$TIME_LIMIT")
  [[ -z $limit ]] || ((SIGNAL_SECONDS == 0 || SIGNAL_SECONDS < limit)) ||
    grid_die "--signal-seconds $SIGNAL_SECONDS is not shorter than --time $TIME_LIMIT ($limit s): every run" \
      "would be told to stop as it starts; give a smaller --signal-seconds (0: no signal)"
}

# The seconds of the SLURM time limit $1 (minutes, M:S, H:M:S, D-H, D-H:M or D-H:M:S); nothing
# for an empty limit or one in another form (UNLIMITED, say), which sbatch itself judges.
slurm_time_seconds() {
  local limit=$1 days=-1 total i
  local -a parts units=(3600 60 1)
  if [[ $limit =~ ^([0-9]+)-([0-9:]+)$ ]]; then
    days=$((10#${BASH_REMATCH[1]})) limit=${BASH_REMATCH[2]}
  fi
  IFS=: read -ra parts <<<"$limit"
  ((${#parts[@]} >= 1 && ${#parts[@]} <= 3)) || return 0
  if ((days < 0)); then  # without days: minutes, M:S or H:M:S
    days=0
    ((${#parts[@]} == 3)) || units=(60 1)
  fi
  total=$((days * 86400))
  for i in "${!parts[@]}"; do
    [[ ${parts[i]} =~ ^[0-9]+$ ]] || return 0
    total=$((total + 10#${parts[i]} * units[i]))
  done
  echo "$total"
}

# The sbatch command that runs the grid as an array, into SBATCH_COMMAND.
build_sbatch_command() {
  local total=$1 self
  self=$SCRIPTS_DIR/$(basename "${BASH_SOURCE[0]}")
  SBATCH_COMMAND=(sbatch "--array=0-$(((total + PER_GPU - 1) / PER_GPU - 1))${MAX_RUNNING:+%$MAX_RUNNING}"
    "--job-name=$(basename "$GRID_OUT")" "--chdir=$PWD"
    "--output=$GRID_OUT/logs/slurm-%A_%a.out" "--export=ALL,SWEEP_SCRIPTS_DIR=$SCRIPTS_DIR")
  [[ -n $PARTITION ]] && SBATCH_COMMAND+=("--partition=$PARTITION")
  ((GPUS > 0)) && SBATCH_COMMAND+=("--gres=gpu:$GPUS")
  [[ -n $TIME_LIMIT ]] && SBATCH_COMMAND+=("--time=$TIME_LIMIT")
  [[ -n $CPUS ]] && SBATCH_COMMAND+=("--cpus-per-task=$CPUS")
  [[ -n $MEMORY ]] && SBATCH_COMMAND+=("--mem=$MEMORY")
  # B: the batch shell gets the signal and forwards it to the run (see the top of this file);
  # append: a requeued task adds to its SLURM output file instead of overwriting it.
  ((SIGNAL_SECONDS > 0)) && SBATCH_COMMAND+=("--signal=B:USR1@$SIGNAL_SECONDS" --requeue --open-mode=append)
  grid_options
  # --per-gpu always: the tasks get this environment (ALL), whose PER_GPU an option may have overridden
  SBATCH_COMMAND+=("${EXTRA_SBATCH[@]}" "$self" --signal-seconds "$SIGNAL_SECONDS" --per-gpu "$PER_GPU"
    "${GRID_REBUILD[@]}" -- "$GRID_SCRIPT" "${GRID_FLAGS[@]}")
}

# One line on what an array task does at its time limit.
describe_time_limit() {
  local runs="a run saves"
  ((PER_GPU == 1)) || runs="each of its runs saves"
  if ((SIGNAL_SECONDS > 0)); then
    echo "on USR1 ($SIGNAL_SECONDS s before the time limit) $runs and the array task requeues itself"
  else
    echo "no warning signal (--signal-seconds 0): a run killed at the time limit continues from its" \
      "last checkpoint when the array is submitted again"
  fi
}

# With --per-gpu K > 1, one line on which points each array task runs at the same time, e.g.
# "2 array tasks, 2 points each at the same time on the task's GPU: task 0: points 0,1; task 1: ...".
describe_packing() {
  local total=$1 tasks task index points line=""
  ((PER_GPU > 1)) || return 0
  tasks=$(((total + PER_GPU - 1) / PER_GPU))
  for ((task = 0; task < tasks; task++)); do
    points=""
    for ((index = task * PER_GPU; index < total && index < (task + 1) * PER_GPU; index++)); do
      points+="${points:+,}$index"
    done
    if [[ $points == *,* ]]; then points="points $points"; else points="point $points"; fi
    line+="${line:+; }task $task: $points"
  done
  echo "$tasks array tasks, up to $PER_GPU points each at the same time on the task's one GPU: $line"
}

print_grid() {
  local total=$1 index state
  echo "grid: $(grid_describe)"
  for ((index = 0; index < total; index++)); do
    grid_point "$index"
    state=$(grid_point_state)
    grid_point_command "$state"
    printf '%4d  %-10s  %s: %s\n' "$index" "$state" "$POINT_NAME" "$(grid_quote "${POINT_COMMAND[@]}")"
  done
}

submit() {
  local total
  total=$(grid_size)
  build_sbatch_command "$total"
  if ((DRY_RUN)); then
    grid_check_flags
    grid_quote "${SBATCH_COMMAND[@]}"
    describe_time_limit
    describe_packing "$total"
    print_grid "$total"
    return 0
  fi
  command -v sbatch >/dev/null ||
    grid_die "sbatch not found: submit from a SLURM login node (--dry-run prints the command)"
  grid_check_flags --record
  mkdir -p "$GRID_OUT/logs"  # SLURM does not create the folder of --output
  echo "$GRID_PROG: $(grid_describe)"
  grid_quote "${SBATCH_COMMAND[@]}"
  describe_time_limit
  describe_packing "$total"
  "${SBATCH_COMMAND[@]}"
}

# The USR1 trap: pass the signal on to every run of this task that is still going.
forward_usr1() {
  local i
  for i in "${!RUN_PIDS[@]}"; do
    [[ -z ${RUN_STATUSES[i]:-} ]] || continue  # ended and waited for
    echo "$GRID_PROG: ${RUN_NAMES[i]}: USR1 (the time limit is near): asking the run to save and stop"
    kill -USR1 "${RUN_PIDS[i]}" 2>/dev/null || true
  done
}

# Start point $1 (selected, not complete, wanted, in state $2) in the background, its output
# appended to its log; its process goes into RUN_PIDS, its index and name into RUN_INDICES and
# RUN_NAMES. The USR1 trap must be set already: SLURM's warning reaches this shell only (B:),
# and a trapped signal interrupts `wait` but would wait for a command in the foreground to end.
start_point() {
  local index=$1 state=$2
  grid_point_command "$state"
  grid_start_log
  echo "$GRID_PROG: point $index $POINT_NAME ($state) on $(hostname), log: $POINT_LOG"
  grid_quote "${POINT_COMMAND[@]}"
  "${POINT_COMMAND[@]}" >>"$POINT_LOG" 2>&1 </dev/null &
  RUN_PIDS+=("$!")
  RUN_INDICES+=("$index")
  RUN_NAMES+=("$POINT_NAME")
}

# Wait until every started run has ended, forwarding USR1 to them meanwhile; their exit codes go
# into RUN_STATUSES (same order as RUN_PIDS).
wait_for_runs() {
  local i status
  for i in "${!RUN_PIDS[@]}"; do
    while true; do
      status=0
      wait "${RUN_PIDS[i]}" || status=$?
      # wait also returns (128 + the signal's number) when a trapped signal arrives: go on
      # waiting while the run lives; after it ended, wait gave its exit code
      kill -0 "${RUN_PIDS[i]}" 2>/dev/null || break
    done
    RUN_STATUSES[i]=$status
  done
}

# The runs named by $@ (each "<index> <name>") stopped for a signal after saving (exit code 3).
# In a SLURM array task with the warning signal on: requeue this task, which then continues them
# with --resume (and skips its complete points); return 0 when requeued. Otherwise
# (--signal-seconds 0, or a task started by hand) say how to go on; return 3.
requeue_task() {
  local task entry label="" them=it
  for entry in "$@"; do label+="${label:+, }$entry"; done
  if (($# > 1)); then label="points $label" them=them; else label="point $label"; fi
  local stopped="$GRID_PROG: $label: stopped by a signal, saved (exit $STOPPED_BY_SIGNAL)"
  if ((SIGNAL_SECONDS == 0)) || [[ -z ${SLURM_ARRAY_JOB_ID:-} ]]; then
    echo "$stopped; the same command (or submitting the array again) continues $them"
    return "$STOPPED_BY_SIGNAL"
  fi
  task=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
  echo "$stopped; requeueing array task $task to continue $them"
  if scontrol requeue "$task"; then
    return 0
  fi
  echo "$GRID_PROG: $label: scontrol requeue $task failed; submit the array again to continue $them"
  return "$STOPPED_BY_SIGNAL"
}

# Say how each run of the task ended; requeue the task if one stopped for a signal. The exit
# code: the first failed run's (in point order), else 0 (or 3 when a stopped run was not
# requeued).
finish_task() {
  local status=$1 i code
  local -a stopped=()
  for i in "${!RUN_PIDS[@]}"; do
    code=${RUN_STATUSES[i]}
    if ((code == 0)); then
      echo "$GRID_PROG: point ${RUN_INDICES[i]} ${RUN_NAMES[i]}: done"
    elif ((code == STOPPED_BY_SIGNAL)); then
      stopped+=("${RUN_INDICES[i]} ${RUN_NAMES[i]}")
    else
      echo "$GRID_PROG: point ${RUN_INDICES[i]} ${RUN_NAMES[i]}: FAILED (exit $code)"
      ((status != 0)) || status=$code
    fi
  done
  if ((${#stopped[@]})); then
    code=0
    requeue_task "${stopped[@]}" || code=$?
    ((status != 0)) || status=$code
  fi
  return "$status"
}

# Array task $1: run its points (PER_GPU of them, at the same time) or skip the complete ones;
# exit with the first failure's exit code (see finish_task).
run_task() {
  local task=$1 total tasks index state status=0
  total=$(grid_size)
  tasks=$(((total + PER_GPU - 1) / PER_GPU))
  [[ $task =~ ^[0-9]+$ ]] || grid_die "SLURM_ARRAY_TASK_ID must be a number, got '$task'"
  ((task < tasks)) || grid_die "SLURM_ARRAY_TASK_ID $task is outside the grid (0-$((tasks - 1))$(
    ((PER_GPU == 1)) || echo ": array tasks of $PER_GPU points each"))"
  grid_check_flags --record
  RUN_PIDS=() RUN_INDICES=() RUN_NAMES=() RUN_STATUSES=()
  trap forward_usr1 USR1
  for ((index = task * PER_GPU; index < total && index < (task + 1) * PER_GPU; index++)); do
    grid_point "$index"
    state=$(grid_point_state)
    if [[ $state == complete ]]; then
      echo "$GRID_PROG: point $index $POINT_NAME: skip (complete)"
    elif ! grid_point_wanted "$state"; then
      echo "$GRID_PROG: point $index $POINT_NAME: FAILED (its results.json says the run stopped early;" \
        "--retry-failed runs it again)"
      ((status != 0)) || status=1
    else
      start_point "$index" "$state"
    fi
  done
  wait_for_runs
  trap - USR1
  finish_task "$status"
}

grid_parse_args "$@"
check_resources
grid_setup "${RUN_ARGS[@]}"
if ((DRY_RUN)) || [[ -z ${SLURM_ARRAY_TASK_ID:-} ]]; then
  submit
else
  run_task "$SLURM_ARRAY_TASK_ID"
fi
