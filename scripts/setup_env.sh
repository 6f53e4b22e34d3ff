#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs coupled_adam_hf into it with its test extras.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (it re-installs only when pyproject.toml changed).
# Bring your own torch: if the venv already has one (for example a CUDA build), it is kept. Otherwise
# TORCH_SPEC (default torch==2.13.0, the CPU build cached on our CI machines) is installed first.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python_bin" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.coupled_adam_hf-installed
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    if ! python -c "import torch" >/dev/null 2>&1; then
        pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
    fi
    pip install --quiet -e ".[test]"
    echo "$want" > "$stamp"
fi
