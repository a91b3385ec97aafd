#!/usr/bin/env bash
# Print one command per line: the paper's grid of sparsity x initialization x growth x
# update frequency x seed for one benchmark split. Feed the lines to run_local.sh or
# slurm_array.sh. Every knob is an environment variable (space-separated lists):
#
#   BENCHMARK=cifar100 TASKS=10 DENSITIES="0.2 0.1 0.05" INITS="ERK uniform" \
#   GROWTHS="random unfired momentum gradient" FREQS="100 400" SEEDS="0" EPOCHS=100 \
#   scripts/grid.sh [extra flags passed to every run...]
#
# BENCHMARK is cifar100 (TASKS 5, 10 or 20) or miniImageNet (TASKS 10). Each run writes
# to runs/grid/<benchmark>_<T>t_<init>_<growth>_d<density>_f<freq>_s<seed>.
set -euo pipefail

BENCHMARK=${BENCHMARK:-cifar100}
TASKS=${TASKS:-10}
DENSITIES=${DENSITIES:-"0.2 0.1 0.05"}
INITS=${INITS:-"ERK uniform"}
GROWTHS=${GROWTHS:-"random unfired momentum gradient"}
FREQS=${FREQS:-"100 400"}
SEEDS=${SEEDS:-0}
EPOCHS=${EPOCHS:-100}
OUT=${OUT:-runs/grid}

case "$BENCHMARK" in
  cifar100) script=cifar100.py ;;
  miniImageNet) script=miniImageNet100.py ;;
  *) echo "grid.sh: BENCHMARK must be cifar100 or miniImageNet, not '$BENCHMARK'" >&2; exit 2 ;;
esac
if (( 100 % TASKS != 0 )); then
  echo "grid.sh: TASKS must divide 100 classes, not '$TASKS'" >&2; exit 2
fi
per_task=$(( 100 / TASKS ))

for seed in $SEEDS; do
  for density in $DENSITIES; do
    for init in $INITS; do
      for growth in $GROWTHS; do
        for freq in $FREQS; do
          name="${BENCHMARK}_${TASKS}t_${init}_${growth}_d${density}_f${freq}_s${seed}"
          printf 'python %s --dataset %s --num_tasks %s --num_classes 100 --num_classes_per_task %s' \
            "$script" "$BENCHMARK" "$TASKS" "$per_task"
          printf ' --sparse_init %s --growth %s --density %s --epochs %s --update_frequency %s --seed %s' \
            "$init" "$growth" "$density" "$EPOCHS" "$freq" "$seed"
          printf ' --output_dir %s/%s' "$OUT" "$name"
          (( $# )) && printf ' %q' "$@"
          printf '\n'
        done
      done
    done
  done
done
