# Sourced by the device scripts: run from the repo root with the package on PYTHONPATH, the cache
# that prepare.sh fills (.devcache), $OUT (default /tmp/gpu-out) and $py (.venv's python if present).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH=$PWD/src PHASELM_CACHE_DIR=$PWD/.devcache/phaselm
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
py=${PY:-$(command -v python3)}
[ -x .venv/bin/python ] && py=.venv/bin/python
