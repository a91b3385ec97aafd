#!/usr/bin/env bash
# The grid of sweep.sh as one SLURM job array, one grid point per array task.
#
#   scripts/sweep_slurm.sh [--partition P] [--gpus N] [--time T] [--cpus N] [--mem M]
#                          [--max-running K] [--sbatch-arg ARG]... [grid options] [--dry-run]
#                          -- cifar100.py [flags for every run]
#
# Without SLURM_ARRAY_TASK_ID it submits itself with the same grid:
#     sbatch --array=0-<N-1> <resources> scripts/sweep_slurm.sh <grid options> -- <script and flags>
# (--dry-run prints that command and the grid instead). As array task i (SLURM_ARRAY_TASK_ID=i,
# set by SLURM, or by hand to run one point anywhere) it runs point i exactly as sweep.sh would:
# nothing when its results.json is complete, else with --resume, the run's output appended to
# OUT/logs/<point>.log. Submitting the same command again therefore finishes what a previous
# array left (timeouts, preemption, failures) and skips the rest.
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
point per task, run as by scripts/sweep.sh: complete points are skipped, others run with
--resume). With SLURM_ARRAY_TASK_ID set it runs that one point instead.

resources (each also from the environment; unset ones are left to the cluster's defaults):
  --partition P      SLURM partition (env SWEEP_PARTITION)
  --gpus N           GPUs per run, as --gres=gpu:N; 0 for none (env SWEEP_GPUS; default 1)
  --time T           time limit per run, e.g. 24:00:00 (env SWEEP_TIME)
  --cpus N           CPUs per run (env SWEEP_CPUS)
  --mem M            memory per run, e.g. 16G (env SWEEP_MEM)
  --max-running K    at most K array tasks at once (env SWEEP_MAX_RUNNING)
  --sbatch-arg ARG   any other sbatch option, e.g. --sbatch-arg=--account=abc (repeatable)
grid:
$GRID_OPTIONS_HELP
  --dry-run          print the sbatch command and the grid, submit nothing
  -h, --help         this help
EOF
}

PARTITION=${SWEEP_PARTITION:-}
GPUS=${SWEEP_GPUS:-1}
TIME_LIMIT=${SWEEP_TIME:-}
CPUS=${SWEEP_CPUS:-}
MEMORY=${SWEEP_MEM:-}
MAX_RUNNING=${SWEEP_MAX_RUNNING:-}
EXTRA_SBATCH=()
DRY_RUN=0

# This script's own options for grid_parse_args: the SLURM resources.
take_script_option() {
  case $1 in
    --partition | --gpus | --time | --cpus | --mem | --max-running | --sbatch-arg)
      (($# >= 2)) || grid_die "$1 needs a value"
      case $1 in
        --partition) PARTITION=$2 ;;
        --gpus) GPUS=$2 ;;
        --time) TIME_LIMIT=$2 ;;
        --cpus) CPUS=$2 ;;
        --mem) MEMORY=$2 ;;
        --max-running) MAX_RUNNING=$2 ;;
        --sbatch-arg) EXTRA_SBATCH+=("$2") ;;
      esac
      GRID_SHIFT=2
      ;;
    *) return 1 ;;
  esac
}

# The resources must be numbers where sbatch wants numbers.
check_resources() {
  [[ $GPUS =~ ^[0-9]+$ ]] || grid_die "--gpus needs a number >= 0, got '$GPUS'"
  [[ -z $CPUS || $CPUS =~ ^[1-9][0-9]*$ ]] || grid_die "--cpus needs a number >= 1, got '$CPUS'"
  [[ -z $MAX_RUNNING || $MAX_RUNNING =~ ^[1-9][0-9]*$ ]] ||
    grid_die "--max-running needs a number >= 1, got '$MAX_RUNNING'"
}

# The sbatch command that runs the grid as an array, into SBATCH_COMMAND.
build_sbatch_command() {
  local total=$1 self
  self=$SCRIPTS_DIR/$(basename "${BASH_SOURCE[0]}")
  SBATCH_COMMAND=(sbatch "--array=0-$((total - 1))${MAX_RUNNING:+%$MAX_RUNNING}"
    "--job-name=$(basename "$GRID_OUT")" "--chdir=$PWD"
    "--output=$GRID_OUT/logs/slurm-%A_%a.out" "--export=ALL,SWEEP_SCRIPTS_DIR=$SCRIPTS_DIR")
  [[ -n $PARTITION ]] && SBATCH_COMMAND+=("--partition=$PARTITION")
  ((GPUS > 0)) && SBATCH_COMMAND+=("--gres=gpu:$GPUS")
  [[ -n $TIME_LIMIT ]] && SBATCH_COMMAND+=("--time=$TIME_LIMIT")
  [[ -n $CPUS ]] && SBATCH_COMMAND+=("--cpus-per-task=$CPUS")
  [[ -n $MEMORY ]] && SBATCH_COMMAND+=("--mem=$MEMORY")
  grid_options
  SBATCH_COMMAND+=("${EXTRA_SBATCH[@]}" "$self" "${GRID_REBUILD[@]}" -- "$GRID_SCRIPT" "${GRID_FLAGS[@]}")
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
    print_grid "$total"
    return 0
  fi
  command -v sbatch >/dev/null ||
    grid_die "sbatch not found: submit from a SLURM login node (--dry-run prints the command)"
  grid_check_flags --record
  mkdir -p "$GRID_OUT/logs"  # SLURM does not create the folder of --output
  echo "$GRID_PROG: $(grid_describe)"
  grid_quote "${SBATCH_COMMAND[@]}"
  "${SBATCH_COMMAND[@]}"
}

# Array task $1: run that point (or skip it), exit with the run's exit code.
run_point() {
  local index=$1 total state status=0
  total=$(grid_size)
  [[ $index =~ ^[0-9]+$ ]] || grid_die "SLURM_ARRAY_TASK_ID must be a number, got '$index'"
  ((index < total)) || grid_die "SLURM_ARRAY_TASK_ID $index is outside the grid (0-$((total - 1)))"
  grid_check_flags --record
  grid_point "$index"
  state=$(grid_point_state)
  if [[ $state == complete ]]; then
    echo "$GRID_PROG: point $index $POINT_NAME: skip (complete)"
    return 0
  fi
  if ! grid_point_wanted "$state"; then
    echo "$GRID_PROG: point $index $POINT_NAME: FAILED (its results.json says the run stopped early;" \
      "--retry-failed runs it again)"
    return 1
  fi
  grid_point_command "$state"
  grid_start_log
  echo "$GRID_PROG: point $index $POINT_NAME ($state) on $(hostname), log: $POINT_LOG"
  grid_quote "${POINT_COMMAND[@]}"
  "${POINT_COMMAND[@]}" >>"$POINT_LOG" 2>&1 </dev/null || status=$?
  if ((status == 0)); then
    echo "$GRID_PROG: point $index $POINT_NAME: done"
  else
    echo "$GRID_PROG: point $index $POINT_NAME: FAILED (exit $status)"
  fi
  return "$status"
}

grid_parse_args "$@"
check_resources
grid_setup "${RUN_ARGS[@]}"
if ((DRY_RUN)) || [[ -z ${SLURM_ARRAY_TASK_ID:-} ]]; then
  submit
else
  run_point "$SLURM_ARRAY_TASK_ID"
fi
