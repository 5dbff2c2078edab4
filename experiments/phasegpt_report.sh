#!/usr/bin/env bash
# Rebuild every PhaseGPT table and plot in results/phasegpt/ from the summarised runs:
#   experiments/phasegpt_report.sh
# Phase A (tiny Shakespeare): table.md, val_curves.png, r_curves.png, against arm "baseline".
# Phase B (python-docs stand-in for WikiText-2): phase_b/table.md, phase_b/val_curves.png,
# phase_b/r_curves.png against phase_b/baseline, and phase_b.md, the preregistered criteria yes/no.
set -euo pipefail
cd "$(dirname "$0")/.."
phaselm=.venv/bin/phaselm
runs=results/phasegpt/runs
$phaselm report grid $runs --exclude phase_b --out results/phasegpt/table.md --plots results/phasegpt
if [ -d $runs/phase_b/baseline ]; then
  $phaselm report grid $runs/phase_b --out results/phasegpt/phase_b/table.md --plots results/phasegpt/phase_b
  $phaselm report criteria $runs/phase_b --out results/phasegpt/phase_b.md
fi
