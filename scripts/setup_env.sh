#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs coupled_adam_hf into it with its test extras.
# Sourced by scripts/demo.sh and scripts/test.sh (which also get its environment variables below); safe to run again (it re-installs only when pyproject.toml changed).
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

# Runtime environment of the project's commands. Offline: the demo and the tests use only what ships or is built
# locally (unset these to let scripts/train.py reach the Hub).
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
# One intra-op thread per process unless set: on a small shared machine torch's default (one per core) spins against
# other processes; measured here at load ~3, a CPU training step ran 7.6x faster with 1 thread than with 2.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
