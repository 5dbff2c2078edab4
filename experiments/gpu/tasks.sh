#!/usr/bin/env bash
# One device call for the synthetic-task suite: MQAR on the mixture of difficulties (docs/tasks.md,
# amendment 2), NPROC shards sharing the one GPU, each a `phaselm bench tasks --shard I/NPROC` process.
#   STAGE=wide (default; issue 24 item 4): widths 256 and 512, where Zoology's curves separate,
#     MODELS (default gpt,mamba,phasegpt_all,pma,pma_lam0), seed 1; out results/tasks/mqar_gpu.
#   STAGE=w64 (issue 21): the CPU's width-64 grid (amendment 3: every model, its sweep, seeds 1-3,
#     the CPU's protocol and its GPT family with the short convolution of amendment 4, so the two are
#     comparable), 16 shards; out results/tasks/mqar_gpu_w64.
#     STEPS (default 4000), WIDTHS (default 64) and MODELS (default all) change the budget, the widths
#     and the models; a changed budget needs another out folder (OUT_DIR=...), since a folder's runs
#     share one protocol. Amendment 6's Mamba family at 12,000 steps, once the budget probe holds:
#     STAGE=w64 STEPS=12000 MODELS=mamba,pma,pma_lam0,pma_frozen OUT_DIR=results/tasks/mqar_gpu_w64_12k
#   STAGE=probe (amendments 6 and 12): that budget probe itself, Mamba at widths 32, 64 and 128, seed 1,
#     lr 3e-3, 12,000 steps, the CPU's settings (too long for a CPU session); out
#     results/tasks/mqar_mamba_budget. Run it first: the Mamba family's stages depend on it.
# Finished runs come back as JSON under $OUT/tasks/mqar/runs; commit them into the out folder and
# the next call skips them (--resume), even on a fresh machine; on the same warm machine interrupted
# runs also resume from their checkpoints (runs/tasks/gpu/<out folder>: each stage its own). Stops itself after LIMIT seconds.
#   run(command="STAGE=w64 experiments/gpu/tasks.sh", timeout_s=590)   # no data to carry: tasks are generated
# SMOKE=1 checks the script on CPU in a minute.
source "$(dirname "$0")/env.sh"
mkdir -p "$OUT/tasks"
LIMIT=${LIMIT:-540}
if [ "${STAGE:-wide}" = probe ]; then
  NPROC=${NPROC:-3}; out=results/tasks/mqar_mamba_budget
  args="--task mqar --mixture --models mamba --widths 32,64,128 --seeds 1 --lrs 3e-3 --steps 12000 --eval-interval 500 --device cuda"
elif [ "${STAGE:-wide}" = w64 ]; then
  NPROC=${NPROC:-16}; out=${OUT_DIR:-results/tasks/mqar_gpu_w64}
  args="--task mqar --mixture ${MODELS:+--models $MODELS} --widths ${WIDTHS:-64} --seeds 3 --steps ${STEPS:-4000} --eval-interval 500 --device cuda"
else
  NPROC=${NPROC:-8}; out=results/tasks/mqar_gpu
  MODELS=${MODELS:-gpt,mamba,phasegpt_all,pma,pma_lam0}
  args="--task mqar --mixture --models $MODELS --widths 256,512 --seeds 1 --steps 4000 --eval-interval 1000 --device cuda"
fi
if [ "${SMOKE:-0}" = 1 ]; then
  NPROC=2; LIMIT=120
  args="--task mqar --mixture --models gpt,mamba --widths 16 --seeds 1 --steps 4 --eval-interval 2 --batch-size 8 \
        --num-train 50 --num-test 16 --lrs 3e-3 --vocab-size 256 --difficulties L64-kv4,L128-kv8 --device cpu"
fi
[ "${SMOKE:-0}" = 1 ] && out=/tmp/tasks-smoke
log="$OUT/tasks/bench.log"
{ date; nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null; } >> "$log" 2>&1
for i in $(seq 0 $((NPROC - 1))); do
  OMP_NUM_THREADS=1 timeout -s TERM $LIMIT $py -m phaselm bench tasks $args --shard $i/$NPROC --out $out \
    --work "runs/tasks/gpu/$(basename $out)" --resume >> "$OUT/tasks/shard$i.log" 2>&1 &
done
wait
echo "shards done $(date)" >> "$log"
$py -m phaselm report tasks $out >> "$log" 2>&1
mkdir -p "$OUT/tasks/mqar" && cp -r $out/runs $out/report.md $out/summary.json $out/*.png "$OUT/tasks/mqar/" 2>/dev/null
for f in "$OUT"/tasks/shard*.log; do tail -c 2000 "$f" > "$f.tail" && mv "$f.tail" "$f"; done
ls "$OUT/tasks/mqar/runs" | wc -l >> "$log"
