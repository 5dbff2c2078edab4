#!/usr/bin/env bash
# Rebuild every PhaseGPT table and plot in results/phasegpt/ from the summarised runs (issue 5):
#   experiments/phasegpt_report.sh
# Phase A (tiny Shakespeare): table.md, val_curves.png, r_curves.png, against arm "baseline".
# Phase B (python-docs stand-in for WikiText-2): phase_b/table.md, phase_b/val_curves.png,
# phase_b/r_curves.png against phase_b/baseline, and phase_b.md, the preregistered criteria yes/no.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
runs=results/phasegpt/runs
$py -m phaselm.evaluation.grid_report $runs --exclude phase_b --out results/phasegpt/table.md --plots results/phasegpt
if [ -d $runs/phase_b/baseline ]; then
  $py -m phaselm.evaluation.grid_report $runs/phase_b --out results/phasegpt/phase_b/table.md --plots results/phasegpt/phase_b
  $py -m phaselm.evaluation.phase_b_criteria $runs/phase_b --out results/phasegpt/phase_b.md
fi
