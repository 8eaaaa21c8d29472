#!/usr/bin/env bash
# Create .venv (if missing) and install modiff-quant with its test tools. torch is installed
# first, pinned, so that the build is chosen on purpose: set TORCH_INDEX_URL to PyTorch's CPU
# wheel index (https://download.pytorch.org/whl/cpu) for the small CPU build, or leave it unset
# for what the configured package index gives (on Linux x86-64 from PyPI: the CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! command -v "$python" > /dev/null; then
    echo "setup: $python not found; install Python 3.11 or later (or set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup: modiff-quant needs Python 3.11 or later; $python is $("$python" -V 2>&1)" \
        "(set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    if ! "$python" -c 'import ensurepip, venv' 2> /dev/null; then
        echo "setup: $python lacks the venv module (on Debian/Ubuntu: apt install python3-venv)" >&2
        exit 1
    fi
    "$python" -m venv .venv
fi
# The install is skipped when nothing it depends on changed since the last one (the package is
# installed editable, so code changes need no reinstall).
stamp=.venv/.installed-from
wanted=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum)
if [ "$(cat "$stamp" 2> /dev/null)" != "$wanted" ]; then
    pip() { .venv/bin/python -m pip install --disable-pip-version-check --progress-bar on "$@"; }
    echo "setup: installing torch 2.13.0${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL} (one large wheel)"
    pip torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} | { grep -v '^Requirement already satisfied' || true; }
    echo "setup: installing modiff-quant and its dependencies (diffusers, torchao, brevitas, accelerate, test tools)"
    pip -c constraints.txt -e ".[test,torchao,brevitas,accelerate]" | { grep -v '^Requirement already satisfied' || true; }
    echo "$wanted" > "$stamp"
fi
.venv/bin/python -c "import modiff_quant, torch; print(f'modiff-quant {modiff_quant.__version__}, torch {torch.__version__}')"
