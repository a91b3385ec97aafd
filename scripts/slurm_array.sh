#!/usr/bin/env bash
# One SLURM array task per line of a commands file (e.g. from grid.sh):
#
#   scripts/grid.sh > grid.txt
#   sbatch --array=1-$(grep -c . grid.txt) --gres=gpu:1 --time=24:00:00 scripts/slurm_array.sh grid.txt
#
#SBATCH --job-name=cl-dst
#SBATCH --output=logs/%A_%a.log
set -euo pipefail
file=${1:?usage: sbatch --array=1-N slurm_array.sh COMMANDS_FILE}
command=$(grep -v '^\s*\(#\|$\)' "$file" | sed -n "${SLURM_ARRAY_TASK_ID:?run me with sbatch --array}p")
[[ -n $command ]] || { echo "slurm_array.sh: no line ${SLURM_ARRAY_TASK_ID} in $file" >&2; exit 2; }
echo "$command"
exec bash -c "$command"
