#!/usr/bin/env bash
# The MQAR suite on the 2-core CPU (docs/tasks.md, amendments 3 and 4): the validity anchor (GPT and
# Mamba at widths 32/64/128, seed 1, with the learning-rate sweep, 4,000 steps), then the phase
# comparisons at width 64, pair by pair. Since amendment 4 the GPT family has a short convolution in
# front of attention (`--short-conv 3`, the default) and its runs go to results/tasks/mqar_conv; the
# runs before it (no convolution) stay in results/tasks/mqar, and the Mamba runs, whose models it does
# not change, are shared. The work is a list of cells; each cell is one `phaselm bench tasks` process
# (its sweep, then its seeds). One worker per core:
#   setsid nohup experiments/tasks_cpu.sh > runs/tasks/worker0.log 2>&1 &
#   setsid nohup experiments/tasks_cpu.sh > runs/tasks/worker1.log 2>&1 &
# Every worker walks the same list and takes the first cell no live worker holds (a claim is a
# folder made atomically, runs/tasks/claims/<cell>, holding the worker's PID; a dead worker's claim
# is taken over), so the two never train the same run and no core waits for the other. Resumable:
# finished runs are skipped and an interrupted one continues from its checkpoint (runs/tasks/...),
# so after a stop the same two commands go on where the work stopped. DRY=1 prints the cells only.
set -u
cd "$(dirname "$0")/.."
CONV="--out results/tasks/mqar_conv --work runs/tasks/mqar_conv"  # amendment 4: the GPT family with its convolution
# a cell: its name, then the arguments of its `bench tasks` run (added to the common ones below; a
# repeated option such as --steps or --out overrides the common one)
CELLS=("gpt-w64_128_32-s1|--models gpt --widths 64,128,32 --seeds 1"
       "mamba-w64-s1|--models mamba --widths 64 --seeds 1"
       "mamba-w32-s1|--models mamba --widths 32 --seeds 1"
       "gpt-w64-s3|--models gpt --widths 64 --seeds 3"
       "mamba-w128-s1|--models mamba --widths 128 --seeds 1"
       # amendment 4: the anchor's attention half again, with the convolution, then the phase pairs at width 64
       "conv-gpt-w64-s3|--models gpt --widths 64 --seeds 3 $CONV"
       "conv-gpt-w128-s1|--models gpt --widths 128 --seeds 1 $CONV"
       "conv-gpt-w32-s1|--models gpt --widths 32 --seeds 1 $CONV"
       "conv-phasegpt_single-w64-s3|--models phasegpt_single --widths 64 --seeds 3 $CONV"
       "conv-phasegpt_all-w64-s3|--models phasegpt_all --widths 64 --seeds 3 $CONV"
       "conv-mamba-w64-s3|--models mamba --widths 64 --seeds 3 $CONV"
       "conv-pma-w64-s3|--models pma --widths 64 --seeds 3 $CONV"
       "conv-pma_lam0-w64-s3|--models pma_lam0 --widths 64 --seeds 3 $CONV")
# Then the controls (phases frozen, coherence bias removed) for an effect that shows. The shared
# Mamba runs are copied from results/tasks/mqar/runs (*__mamba__*) into results/tasks/mqar_conv/runs
# (the width-128 ones once mamba-w128-s1 is done), so their sweeps are not trained again.
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
