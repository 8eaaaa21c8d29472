#!/usr/bin/env bash
# The main job: set up, then full precision vs plain W8A4 vs MoDiff W8A4 on the bundled digits16 model (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
bash scripts/setup.sh
exec .venv/bin/modiff-quant demo "$@"
