#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv if missing, then runs the main job or the tests.
#   bash simulations/run.sh demo [args...]   # the main job
#   bash simulations/run.sh test [pytest args...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export TORCH_HOME="${TORCH_HOME:-$root/.cache/torch}" HF_HOME="${HF_HOME:-$root/.cache/hf}"
export HF_HUB_OFFLINE=1 RAY_TMPDIR="${RAY_TMPDIR:-/tmp/ray-difusal}" MPLCONFIGDIR="$root/.cache/mpl"
venv="$root/.venv"
stamp="$venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e ".[test]"
  rm -f "$venv"/.installed-*; touch "$stamp"
fi
cmd="${1:-demo}"; shift || true
case "$cmd" in
  test) exec "$venv/bin/python" -m pytest "$@" ;;
  *)    exec "$venv/bin/python" -m simulations.cli "$cmd" "$@" ;;
esac
