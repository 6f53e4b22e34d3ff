#!/usr/bin/env bash
# The whole test suite, from nothing: sets up ./.venv, then runs pytest offline. Extra arguments go to pytest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC1091
source "$here/setup_env.sh"
exec python -m pytest "$@"
