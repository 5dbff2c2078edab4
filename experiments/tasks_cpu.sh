#!/usr/bin/env bash
# The MQAR suite on the 2-core CPU (docs/tasks.md, amendment 3): the validity anchor (GPT and Mamba at
# widths 32/64/128, seed 1, with the learning-rate sweep), then the phase comparisons at width 64, in
# the order the verdicts need them. The work is a list of cells (model, widths, seeds); each cell is
# one `phaselm bench tasks` process (its sweep, then its seeds). Start one worker per core:
#   setsid nohup experiments/tasks_cpu.sh > runs/tasks/worker0.log 2>&1 &
#   setsid nohup experiments/tasks_cpu.sh > runs/tasks/worker1.log 2>&1 &
# Every worker walks the same list and takes the first cell no live worker holds (a claim is a
# folder made atomically, runs/tasks/claims/<cell>, holding the worker's PID; a dead worker's claim
# is taken over), so the two never train the same run and no core waits for the other. Resumable:
# finished runs are skipped and an interrupted one continues from its checkpoint (runs/tasks/mqar),
# so after a stop the same two commands go on where the work stopped. DRY=1 prints the cells only.
set -u
cd "$(dirname "$0")/.."
CELLS=("gpt 64,128,32 1" "mamba 64 1" "mamba 32 1" "mamba 128 1" "gpt 64 3" "phasegpt_all 64 3"
       "phasegpt_single 64 3" "pma_lam0 64 3" "pma 64 3" "mamba 64 3" "phasegpt_frozen 64 3"
       "phasegpt_nobias 64 3" "pma_frozen 64 3")
claims=runs/tasks/claims
mkdir -p "$claims"

claim() {  # claim "$name": 0 if this worker now holds it
  local dir="$claims/$1"
  if mkdir "$dir" 2>/dev/null; then echo $$ > "$dir/pid"; return 0; fi
  local pid; pid=$(cat "$dir/pid" 2>/dev/null)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then return 1; fi
  echo $$ > "$dir/pid"  # the holder is gone (a stopped session): take its cell over
}

for cell in "${CELLS[@]}"; do
  read -r model widths seeds <<< "$cell"
  name="$model-w${widths//,/_}-s$seeds"
  [ -e "$claims/$name/done" ] && continue
  claim "$name" || continue
  if [ "${DRY:-0}" = 1 ]; then echo "cell $name"; rm -r "$claims/$name"; continue; fi
  echo "$(date -u +%FT%TZ) worker $$: $name" >&2
  if OMP_NUM_THREADS=1 .venv/bin/phaselm bench tasks --task mqar --mixture --models "$model" --widths "$widths" \
      --seeds "$seeds" --steps 4000 --eval-interval 500 --out results/tasks/mqar --resume > "runs/tasks/$name.log" 2>&1; then
    touch "$claims/$name/done"
  else
    echo "$(date -u +%FT%TZ) worker $$: $name failed, see runs/tasks/$name.log" >&2
  fi
done
