#!/usr/bin/env bash
# Train PhaseGPT CPU-scale arms over seeds and summarise each run into results/phasegpt/runs/.
#   experiments/phasegpt_cpu_grid.sh "baseline phase_a_winner phase_a/layer6_osc32" "1 2 3"
# Arms are config names under configs/phasegpt/cpu/ (without .yaml); see experiments/grid.sh.
exec "$(dirname "$0")/grid.sh" configs/phasegpt/cpu results/phasegpt/runs "${1:-baseline phase_a_winner}" "${2:-1 2 3}"
