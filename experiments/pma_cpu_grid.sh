#!/usr/bin/env bash
# The PMA CPU experiments: the tiny hybrid, GPT and pure-Mamba baselines (3 seeds each),
# then the four ablations (seed 1; more seeds as given). Results: results/pma/runs/.
#   experiments/pma_cpu_grid.sh ["SEEDS for the main arms"] ["SEEDS for the ablations"]
set -euo pipefail
cd "$(dirname "$0")/.."
experiments/grid.sh configs/pma results/pma/runs "tiny cpu/gpt cpu/mamba" "1"
experiments/grid.sh configs/pma results/pma/runs \
  "cpu/ablations/lambda0 cpu/ablations/no_ssm cpu/ablations/k_constant cpu/ablations/interleaved" "${2:-1}"
experiments/grid.sh configs/pma results/pma/runs "tiny cpu/gpt cpu/mamba" "${1:-1 2 3}"
