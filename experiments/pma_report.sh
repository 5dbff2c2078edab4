#!/usr/bin/env bash
# Rebuild the PMA table and plots in results/pma/ from the summarised runs, then (when the trained
# tiny hybrids are still in runs/pma/tiny/) the intervention sweep:
#   experiments/pma_report.sh
set -euo pipefail
cd "$(dirname "$0")/.."
phaselm=.venv/bin/phaselm
$phaselm report grid results/pma/runs --baseline tiny --out results/pma/table.md --plots results/pma
hybrids=$(ls -d runs/pma/tiny/seed-* 2>/dev/null || true)
if [ -n "$hybrids" ]; then
  $phaselm report interventions $hybrids --out results/pma --prompts 16
fi
