#!/usr/bin/env bash
# One device call for issue 24 item 4 (the synthetic-task suite at widths 256 and 512, where
# Zoology's curves separate): MQAR on the mixture of difficulties (docs/tasks.md, amendment 2),
# NPROC shards sharing the one GPU, each a `phaselm bench tasks --shard I/NPROC` process. Finished
# runs come back as JSON under $OUT/tasks/mqar/runs; on the same warm machine a later call resumes
# interrupted runs from their checkpoints (runs/tasks/gpu). Stops itself after LIMIT seconds.
#   run(command="experiments/gpu/tasks.sh", timeout_s=590)          # no data to carry: tasks are generated
# SMOKE=1 checks the script on CPU in a minute.
source "$(dirname "$0")/env.sh"
mkdir -p "$OUT/tasks"
NPROC=${NPROC:-8}; LIMIT=${LIMIT:-540}
MODELS=${MODELS:-gpt,mamba,phasegpt_all,pma,pma_lam0}
args="--task mqar --mixture --models $MODELS --widths 256,512 --seeds 1 --steps 4000 --eval-interval 1000 --device cuda"
if [ "${SMOKE:-0}" = 1 ]; then
  NPROC=2; LIMIT=120
  args="--task mqar --mixture --models gpt,mamba --widths 16 --seeds 1 --steps 4 --eval-interval 2 --batch-size 8 \
        --num-train 50 --num-test 16 --lrs 3e-3 --vocab-size 256 --difficulties L64-kv4,L128-kv8 --device cpu"
fi
out=results/tasks/mqar_gpu; [ "${SMOKE:-0}" = 1 ] && out=/tmp/tasks-smoke
log="$OUT/tasks/bench.log"
{ date; nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null; } >> "$log" 2>&1
for i in $(seq 0 $((NPROC - 1))); do
  OMP_NUM_THREADS=1 timeout -s TERM $LIMIT $py -m phaselm bench tasks $args --shard $i/$NPROC --out $out \
    --work runs/tasks/gpu --resume >> "$OUT/tasks/shard$i.log" 2>&1 &
done
wait
echo "shards done $(date)" >> "$log"
$py -m phaselm report tasks $out >> "$log" 2>&1
mkdir -p "$OUT/tasks/mqar" && cp -r $out/runs $out/report.md $out/summary.json $out/*.png "$OUT/tasks/mqar/" 2>/dev/null
for f in "$OUT"/tasks/shard*.log; do tail -c 2000 "$f" > "$f.tail" && mv "$f.tail" "$f"; done
ls "$OUT/tasks/mqar/runs" | wc -l >> "$log"
