#!/usr/bin/env bash
# The MQAR suite on the 2-core CPU (docs/tasks.md, amendment 3): the validity anchor (GPT and Mamba at
# widths 32/64/128, seed 1, with the learning-rate sweep), GPT seeds 2-3 at width 64, the budget probe,
# then (once the budget is settled) the phase comparisons at width 64. The work is a list of cells;
# each cell is one `phaselm bench tasks` process (its sweep, then its seeds). One worker per core:
#   setsid nohup experiments/tasks_cpu.sh > runs/tasks/worker0.log 2>&1 &
#   setsid nohup experiments/tasks_cpu.sh > runs/tasks/worker1.log 2>&1 &
# Every worker walks the same list and takes the first cell no live worker holds (a claim is a
# folder made atomically, runs/tasks/claims/<cell>, holding the worker's PID; a dead worker's claim
# is taken over), so the two never train the same run and no core waits for the other. Resumable:
# finished runs are skipped and an interrupted one continues from its checkpoint (runs/tasks/mqar),
# so after a stop the same two commands go on where the work stopped. DRY=1 prints the cells only.
set -u
cd "$(dirname "$0")/.."
PROBE="--lrs 3e-3 --steps 12000 --out results/tasks/mqar_budget --work runs/tasks/mqar_budget"  # the budget probe's settings
# a cell: its name, then the arguments of its `bench tasks` run (added to the common ones below; a
# repeated option such as --steps or --out overrides the common one)
CELLS=("gpt-w64_128_32-s1|--models gpt --widths 64,128,32 --seeds 1"
       "mamba-w64-s1|--models mamba --widths 64 --seeds 1"
       "mamba-w32-s1|--models mamba --widths 32 --seeds 1"
       "mamba-w128-s1|--models mamba --widths 128 --seeds 1"
       "gpt-w64-s3|--models gpt --widths 64 --seeds 3"
       # the budget probe (the GPT at width 64 left the plateau at seed 1 only in 4,000 steps; see
       # results/tasks/README.md): the same runs for 12,000 steps, in their own folders
       "budget-gpt-w64-s3|--models gpt --widths 64 --seeds 3 $PROBE"
       "budget-mamba-w64-s1|--models mamba --widths 64 --seeds 1 $PROBE")
# The phase cells (PhaseGPT both placements, PMA with and without λ, Mamba seeds 2-3, the controls, all at
# width 64) wait for the training budget that the probe decides (docs/tasks.md, amendment 3).
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
  name=${cell%%|*}; args=${cell#*|}
  [ -e "$claims/$name/done" ] && continue
  claim "$name" || continue
  if [ "${DRY:-0}" = 1 ]; then echo "cell $name"; rm -r "$claims/$name"; continue; fi
  echo "$(date -u +%FT%TZ) worker $$: $name" >&2
  # shellcheck disable=SC2086  # $args is a list of options
  if OMP_NUM_THREADS=1 .venv/bin/phaselm bench tasks --task mqar --mixture --steps 4000 --eval-interval 500 \
      --out results/tasks/mqar --resume $args > "runs/tasks/$name.log" 2>&1; then
    touch "$claims/$name/done"
  else
    echo "$(date -u +%FT%TZ) worker $$: $name failed, see runs/tasks/$name.log" >&2
  fi
done
