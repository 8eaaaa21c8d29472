#!/usr/bin/env bash
# The test suite: set up, then pytest (unit, property-based and integration tests).
# `bash scripts/test.sh --fast [pytest args]` is the fast tier: everything but the tests marked
# `slow` (those that sample many steps, calibrate, or run the quality gate).
# Tests run on one pytest-xdist worker per core (one torch thread each, see tests/conftest.py),
# longest first, an idle worker taking queued tests from a busy one (`--dist worksteal`);
# `TEST_WORKERS=0` runs them in this process, e.g. to debug one test.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
bash scripts/setup.sh
if [ "${1:-}" = "--fast" ]; then
    shift
    exec .venv/bin/python -m pytest -p no:cacheprovider -n "${TEST_WORKERS:-auto}" --dist worksteal -m "not slow" "$@"
fi
exec .venv/bin/python -m pytest -p no:cacheprovider -n "${TEST_WORKERS:-auto}" --dist worksteal "$@"
