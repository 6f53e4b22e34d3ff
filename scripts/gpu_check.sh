#!/usr/bin/env bash
# The GPU check in one command, on a machine with a CUDA GPU and this repository (see scripts/gpu_check.py).
# Keeps a CUDA torch that is already installed: a new .venv sees the system's packages when the system Python has
# one; otherwise scripts/setup_env.sh installs the project as for the tests (set TORCH_SPEC to a CUDA build).
# Arguments go to gpu_check.py (e.g. --dry-run, --stages bench, --output_dir DIR, --overwrite).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ] && "$python_bin" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    "$python_bin" -m venv --system-site-packages .venv   # the system's CUDA torch stays the one in use
    .venv/bin/python -m pip install --quiet -e ".[test]" || .venv/bin/python -m pip install --quiet --no-deps -e .
fi
# shellcheck disable=SC1091
source "$root/scripts/setup_env.sh"
exec python scripts/gpu_check.py "$@"
