#!/usr/bin/env bash
# The MQAR suite on the 2-core CPU, in the order the verdicts need it (docs/tasks.md): the validity
# anchor (GPT and Mamba, seed 1 with the learning-rate sweep), seeds 2-3 of GPT, then the phase models
# against their baselines, then the Mamba family. Each step runs N shards (one process per core,
# one torch thread each) and starts when every shard of the step before has finished, so no two
# processes ever train the same run. Resumable: run it again and finished runs are skipped,
# interrupted ones continue from their checkpoints (runs/tasks/mqar).
#   experiments/tasks_cpu.sh [N] [first step, 1-based]      e.g. experiments/tasks_cpu.sh 2 3
set -u
cd "$(dirname "$0")/.."
N=${1:-2}; FIRST=${2:-1}
STEPS=("gpt --seeds 1" "mamba --seeds 1" "gpt --seeds 3" "phasegpt_all --seeds 3" "phasegpt_single --seeds 3"
       "phasegpt_nobias --seeds 3" "phasegpt_frozen --seeds 3" "mamba --seeds 3" "pma_lam0 --seeds 3" "pma --seeds 3"
       "pma_frozen --seeds 3")
for k in $(seq "$FIRST" ${#STEPS[@]}); do
  step=${STEPS[$((k - 1))]}
  echo "$(date -u +%FT%TZ) step $k: --models $step" >&2
  for i in $(seq 0 $((N - 1))); do
    OMP_NUM_THREADS=1 .venv/bin/phaselm bench tasks --task mqar --mixture --models $step --widths 64,128,32 \
      --steps 4000 --eval-interval 500 --shard "$i/$N" --out results/tasks/mqar --resume > "runs/tasks/mqar-shard$i.log" 2>&1 &
  done
  wait
done
