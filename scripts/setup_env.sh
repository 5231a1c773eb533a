#!/usr/bin/env bash
# Creates or reuses ./.venv with everything ioattn needs. A machine that already has a CUDA build of
# torch (the GPU image) gets a venv that sees it and downloads nothing; a CPU machine gets the pinned
# CPU wheel of torch, the GPU image's triton, and a numpy that Triton's interpreter accepts.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
stamp="$VENV/.ioattn-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then exit 0; fi
if python3 -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    [ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
else
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "torch==2.13.0" "triton==3.6.0" "numpy<2.3"
    "$VENV/bin/python" -m pip install -q -e ".[test,bench]"
fi
touch "$stamp"
