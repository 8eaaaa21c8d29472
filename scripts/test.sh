#!/usr/bin/env bash
# The test suite: set up, then pytest (unit, property-based and integration tests).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
bash scripts/setup.sh
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
