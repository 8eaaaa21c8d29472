#!/usr/bin/env bash
# Static checks, run by CI before the tests: ruff (lint and format) and import-linter (the
# storeys of docs/architecture.md: every import points down, no loops).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports
