#!/usr/bin/env bash
# Train config arms over seeds and summarise each run into RESULTS_ROOT/ARM/seed-N/.
#   experiments/grid.sh CONFIG_ROOT RESULTS_ROOT "ARMS" "SEEDS"
#   experiments/grid.sh configs/pma results/pma/runs "tiny cpu/gpt cpu/mamba" "1 2 3"
# An arm is a config path under CONFIG_ROOT without .yaml; its run goes to runs/<CONFIG_ROOT minus
# configs/>/ARM/seed-N. Seeds alternate across arms (seed 1 of every arm first), so a partial grid
# is balanced. A run already summarised is skipped, so the script can be rerun after a stop.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$1; results=$2; arms=$3; seeds=${4:-"1 2 3"}
for seed in $seeds; do
  for arm in $arms; do
    out="runs/${root#configs/}/$arm/seed-$seed"
    res="$results/$arm/seed-$seed"
    [ -f "$res/summary.json" ] && continue
    cmd="phaselm train $root/$arm.yaml train.seed=$seed train.out_dir=$out"
    rm -rf "$out"
    .venv/bin/$cmd
    .venv/bin/phaselm report run "$out" "$res" --command "$cmd" > /dev/null
    echo "done: $arm seed $seed"
  done
done
