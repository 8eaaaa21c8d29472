#!/usr/bin/env bash
# Create .venv (if missing) and install modiff-quant with its test tools. torch is installed
# first, pinned, so that pip takes the local CPU wheel instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
pip() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
pip torch==2.13.0
pip -c constraints.txt -e ".[test,torchao,brevitas]"
.venv/bin/python -c "import modiff_quant, torch; print(f'modiff-quant {modiff_quant.__version__}, torch {torch.__version__}')"
