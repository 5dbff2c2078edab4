#!/usr/bin/env bash
# Train PhaseGPT CPU-scale arms over seeds and summarise each run into results/phasegpt/runs/.
#   experiments/phasegpt_cpu_grid.sh "baseline phase_a_winner phase_a/layer6_osc32" "1 2 3"
# Arms are config names under configs/phasegpt/cpu/ (without .yaml). Seeds alternate across arms
# (seed 1 of every arm first), so a partial grid is balanced. A run already summarised is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
arms=${1:-"baseline phase_a_winner"}
seeds=${2:-"1 2 3"}
for seed in $seeds; do
  for arm in $arms; do
    out="runs/phasegpt/cpu/$arm/seed-$seed"
    res="results/phasegpt/runs/$arm/seed-$seed"
    [ -f "$res/summary.json" ] && continue
    cmd="phaselm train configs/phasegpt/cpu/$arm.yaml train.seed=$seed train.out_dir=$out"
    rm -rf "$out"
    .venv/bin/$cmd
    .venv/bin/python -m phaselm.evaluation.run_report "$out" "$res" "$cmd" > /dev/null
    echo "done: $arm seed $seed"
  done
done
