#!/usr/bin/env bash
# Create .venv (if missing) and install modiff-quant with its test tools. torch is installed
# first, pinned, so that pip takes the local CPU wheel instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# The install is skipped when nothing it depends on changed since the last one (the package is
# installed editable, so code changes need no reinstall).
stamp=.venv/.installed-from
wanted=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    pip() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
    pip torch==2.13.0
    pip -c constraints.txt -e ".[test,torchao,brevitas]"
    echo "$wanted" > "$stamp"
fi
.venv/bin/python -c "import modiff_quant, torch; print(f'modiff-quant {modiff_quant.__version__}, torch {torch.__version__}')"
