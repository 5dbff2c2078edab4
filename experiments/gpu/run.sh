#!/usr/bin/env bash
# One device call (about 9 minutes of an H100/H200), from the repo root, writing to $OUT:
#   1. the nanoGPT reference (configs/gpt/shakespeare_char_nanogpt.yaml; resumes a run left by an
#      earlier call on the same warm machine), then its summary (val loss next to nanoGPT's 1.4697,
#      tokens/s, MFU from the log);
#   2. a 60-step torch.compile run of the same config (does compile work, tokens/s with it);
#   3. the speed scripts on cuda: PhaseGPT step / GPT step, PMA attention / SDPA, parallel scan /
#      sequential, phaselm GPT / GPT-2 training tokens/s.
# Everything lands in $OUT/gpu.log, $OUT/nanogpt_summary.json and $OUT/speed.json (3 files).
# SMOKE=1 shrinks every part (CPU check of the script itself).
source "$(dirname "$0")/env.sh"
log="$OUT/gpu.log"
# every part gets at most its own cap and never more than what is left of LIMIT seconds (the call's
# limit, less a margin to bring $OUT back), so the last parts are cut short, not the whole call
LIMIT=${LIMIT:-560}
cap() { local left=$((LIMIT - SECONDS)); [ "$left" -lt "$1" ] && echo $((left > 1 ? left : 1)) || echo "$1"; }
device=cuda; iters=""; steps=""; reps=3
if [ "${SMOKE:-0}" = 1 ]; then
  device=cpu; iters="train.max_iters=4 train.eval_interval=2 train.eval_max_tokens=2048 train.batch_size=4 train.device=cpu"
  steps="--repeats 1"; reps=1
fi
{ date; nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null; $py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } >> "$log" 2>&1

run_dir=runs/gpu/nanogpt
resume=""; [ -d $run_dir/checkpoints ] && resume=--resume
timeout $(cap 330) $py -m phaselm train configs/gpt/shakespeare_char_nanogpt.yaml train.out_dir=$run_dir $iters $resume >> "$log" 2>&1
echo "train exit $?" >> "$log"
$py -m phaselm report run $run_dir "$OUT/nanogpt" --command "phaselm train configs/gpt/shakespeare_char_nanogpt.yaml" >> "$log" 2>&1 \
  && mv "$OUT/nanogpt/summary.json" "$OUT/nanogpt_summary.json" && rmdir "$OUT/nanogpt"
tail -n 3 $run_dir/metrics.jsonl >> "$log" 2>/dev/null

c_iters="train.max_iters=60 train.eval_interval=1000 train.log_interval=10"
[ "${SMOKE:-0}" = 1 ] && c_iters="$iters train.max_iters=3"
rm -rf runs/gpu/compiled
timeout $(cap 150) $py -m phaselm train configs/gpt/shakespeare_char_nanogpt.yaml train.out_dir=runs/gpu/compiled train.compile=true $c_iters >> "$log" 2>&1
echo "compile run exit $?; its last train rows:" >> "$log"
grep '"train"' runs/gpu/compiled/metrics.jsonl 2>/dev/null | tail -n 2 >> "$log"

mkdir -p "$OUT/json"
for b in phase_attention_speed pma_speed ssm_speed train_speed; do
  echo "== $b" >> "$log"
  extra="--repeats $reps"; [ $b = train_speed ] && [ "${SMOKE:-0}" = 1 ] && extra="$extra --steps 2"
  timeout $(cap 90) $py benchmarks/$b.py --device $device $extra --json "$OUT/json/$b.json" >> "$log" 2>&1
  echo "exit $?" >> "$log"
done
$py - "$OUT" <<'PY' >> "$log" 2>&1
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
merged = {p.stem: json.loads(p.read_text()) for p in sorted((out / "json").glob("*.json"))}
(out / "speed.json").write_text(json.dumps(merged, indent=1))
for p in (out / "json").glob("*.json"):
    p.unlink()
(out / "json").rmdir()
print("speed.json:", sorted(merged))
PY
date >> "$log"
