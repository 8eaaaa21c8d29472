#!/usr/bin/env bash
# The main job: set up, then plain vs MoDiff on the paper's CIFAR-10 UNet (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
bash scripts/setup.sh
exec .venv/bin/modiff-quant demo "$@"
