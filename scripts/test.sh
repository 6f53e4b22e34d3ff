#!/usr/bin/env bash
# The whole test suite, from nothing: sets up ./.venv, then runs pytest offline. Extra arguments go to pytest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC1091
source "$here/setup_env.sh"
# Test files are spread over PYTEST_WORKERS processes (pytest-xdist; default 2; 0 runs them in this process), each
# file on one worker so that its module fixtures run once. Most of the suite's time is spent in one-thread
# subprocesses (training scripts, launchers), so two workers keep two cores busy.
exec python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
