#!/usr/bin/env bash
# The synthetic-task suite on the 2-core CPU (docs/tasks.md, amendments 3-5): the MQAR validity anchor
# (GPT and Mamba at widths 32/64/128, seed 1, with the learning-rate sweep, 4,000 steps), then the phase
# comparisons, pair by pair (MQAR; fuzzy recall for the GPT family, amendment 5). Since amendment 4
# the GPT family has a short convolution in front of attention (`--short-conv 3`, the default) and
# its MQAR runs go to results/tasks/mqar_conv; the runs before it (no convolution) stay in
# results/tasks/mqar, and the Mamba runs, whose models it does not change, are shared (copied from
# results/tasks/mqar/runs, *__mamba__*, into results/tasks/mqar_conv/runs, so their sweeps are not
# trained again). The work is the list of cells in experiments/tasks_cpu.cells; each cell is one
# `phaselm bench tasks` process (its sweep, then its seeds). One worker per core:
#   setsid nohup experiments/tasks_cpu.sh > runs/tasks/worker0.log 2>&1 &
#   setsid nohup experiments/tasks_cpu.sh > runs/tasks/worker1.log 2>&1 &
# Before each cell a worker re-reads the list and takes the first cell no live worker holds (a claim
# is a folder made atomically, runs/tasks/claims/<cell>, holding the worker's PID; a dead worker's
# claim is taken over), so the two never train the same run and no core waits for the other. A cell
# whose runs need a sweep another cell has not finished exits at once (`--no-wait`, status 75); the
# worker gives it back and takes the next cell, and tries it again after its next finished cell.
# Resumable: finished runs are skipped and an interrupted one continues from its checkpoint
# (runs/tasks/...), so after a stop the same two commands go on where the work stopped. Finished runs
# live on as their committed JSONs; checkpoints and claims live in runs/ (not committed), so on a new
# checkout an interrupted run starts again and a cell must fit one stay of the machine to finish.
# DRY=1 prints the cells still to run.
set -u
cd "$(dirname "$0")/.."
MQAR="--task mqar --mixture --short-conv 0 --out results/tasks/mqar"  # amendment 2: Zoology's mixture (no convolution)
CONV="--task mqar --mixture --out results/tasks/mqar_conv --work runs/tasks/mqar_conv"  # amendment 4: with it
FUZZY="--task fuzzy_recall --difficulties L128 --out results/tasks/fuzzy_recall"  # amendment 5
claims=runs/tasks/claims
mkdir -p "$claims"

claim() {  # claim "$name": 0 if this worker now holds it
  local dir="$claims/$1"
  if mkdir "$dir" 2>/dev/null; then echo $$ > "$dir/pid"; return 0; fi
  local pid; pid=$(cat "$dir/pid" 2>/dev/null)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then return 1; fi
  echo $$ > "$dir/pid"  # the holder is gone (a stopped session): take its cell over
}

deferred=" "  # cells whose runs wait for another cell's sweep (bench exit 75), skipped until a cell finishes
next_cell() {  # print the first cell of the list that this worker can claim now
  local line name
  while IFS= read -r line; do
    case "$line" in ''|'#'*) continue ;; esac
    name=${line%%|*}
    [ -e "$claims/$name/done" ] && continue
    case "$deferred" in *" $name "*) continue ;; esac
    if [ "${DRY:-0}" = 1 ]; then echo "cell $name"; continue; fi
    claim "$name" && { echo "$line"; return 0; }
  done < experiments/tasks_cpu.cells
  return 1
}

[ "${DRY:-0}" = 1 ] && { next_cell; exit 0; }
while true; do
  if ! cell=$(next_cell); then
    [ "$deferred" = " " ] && break  # nothing left
    sleep 60; deferred=" "; continue  # only cells that wait for a sweep: look again in a minute
  fi
  name=${cell%%|*}; args=${cell#*|}; args=${args//\$MQAR/$MQAR}; args=${args//\$CONV/$CONV}; args=${args//\$FUZZY/$FUZZY}
  echo "$(date -u +%FT%TZ) worker $$: $name" >&2
  # shellcheck disable=SC2086  # $args is a list of options
  OMP_NUM_THREADS=1 .venv/bin/phaselm bench tasks --steps 4000 --eval-interval 500 --resume --no-wait $args \
      > "runs/tasks/$name.log" 2>&1
  status=$?
  if [ $status = 0 ]; then
    touch "$claims/$name/done"; deferred=" "
  elif [ $status = 75 ]; then  # its sweep is unfinished (another cell): give the cell back, take the next one
    echo "$(date -u +%FT%TZ) worker $$: $name waits for its sweep; deferred" >&2
    rm -rf "${claims:?}/$name"; deferred="$deferred$name "
  else
    echo "$(date -u +%FT%TZ) worker $$: $name failed, see runs/tasks/$name.log" >&2
    touch "$claims/$name/failed"  # its claim stays with this live worker, so the worker goes on to the next cell
  fi
done
