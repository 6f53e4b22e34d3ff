#!/usr/bin/env bash
# The main job, from nothing: sets up ./.venv, then trains AdamW vs Coupled Adam on the shipped Shakespeare text
# and compares them. Extra arguments go to scripts/demo.py (see --help).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC1091
source "$here/setup_env.sh"
exec python "$here/demo.py" "$@"
