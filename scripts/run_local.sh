#!/usr/bin/env bash
# Run a file of commands (one per line, e.g. from grid.sh) from the project root, JOBS at a
# time. With GPUS > 0, the i-th command gets GPU (i mod GPUS) via CUDA_VISIBLE_DEVICES.
#
#   scripts/grid.sh > grid.txt && JOBS=4 GPUS=4 scripts/run_local.sh grid.txt
#
# Command i's output goes to $LOGS/i.log (LOGS=logs, relative to where you call it). A failed
# run does not stop the others; they are listed in $LOGS/failed.txt and the exit code is 1. To
# pick up an interrupted sweep, generate the grid with --resume as an extra flag and run again.
set -uo pipefail
file=$(realpath "${1:?usage: run_local.sh COMMANDS_FILE}") || exit 2
[[ -r $file ]] || { echo "run_local.sh: cannot read $file" >&2; exit 2; }
JOBS=${JOBS:-1}
GPUS=${GPUS:-0}
LOGS=$(realpath -m "${LOGS:-logs}")
cd "$(dirname "$0")/.."
mkdir -p "$LOGS"
failures=$LOGS/failed.txt
: > "$failures"

run_one() {
  local index=$1 command=$2
  (( GPUS > 0 )) && export CUDA_VISIBLE_DEVICES=$(( index % GPUS ))
  if bash -c "$command" > "$LOGS/$index.log" 2>&1; then
    echo "done   $index: $command"
  else
    echo "FAILED $index (see $LOGS/$index.log): $command"
    echo "$index: $command" >> "$failures"
  fi
}

index=0
while IFS= read -r command; do
  [[ -z ${command// } || $command == \#* ]] && continue
  index=$(( index + 1 ))
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
  run_one "$index" "$command" &
done < "$file"
wait
[[ -s $failures ]] && { echo "$(wc -l < "$failures") run(s) failed, listed in $failures"; exit 1; }
exit 0
