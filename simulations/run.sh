#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv if missing, then runs the main job or the tests.
# Any other command goes to the difusal console script: bash simulations/run.sh report RUN_DIR, ...
#   bash simulations/run.sh demo [args...]   # the main job
#   bash simulations/run.sh test [pytest args...]   # 2 pytest-xdist workers; DIFUSAL_TEST_WORKERS=0 runs serially
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export TORCH_HOME="${TORCH_HOME:-$root/.cache/torch}" HF_HOME="${HF_HOME:-$root/.cache/hf}"
export HF_HUB_OFFLINE=1 RAY_TMPDIR="${RAY_TMPDIR:-/tmp/ray-difusal}" MPLCONFIGDIR="$root/.cache/mpl"
venv="$root/.venv"
stamp="$venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  mkdir -p "$root/.cache"; log="$root/.cache/install.log"; t0=$(date +%s)
  echo "[difusal] installing into .venv (a few minutes the first time; pip's output: $log)"
  { [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --upgrade pip
    "$venv/bin/python" -m pip install -e ".[test]"; } >"$log" 2>&1 \
    || { echo "[difusal] install failed; the last lines of $log:" >&2; tail -n 20 "$log" >&2; exit 1; }
  rm -f "$venv"/.installed-*; touch "$stamp"
  echo "[difusal] installed in $(( $(date +%s) - t0 )) s: $("$venv/bin/python" -m pip list 2>/dev/null | tail -n +3 | wc -l) packages ($venv)"
fi
cmd="${1:-demo}"; shift || true
case "$cmd" in
  # Two workers on two cores: the end-to-end tests spend much of their time waiting on Flower's processes, so two
  # at a time nearly halve the suite (tests/conftest.py shares its federations between the workers and runs the
  # end-to-end tests first). --maxschedchunk 1: the workers take the tests from one queue, one at a time, so the
  # two share the Flower tests instead of one worker holding a chunk of them while the other runs out.
  test) exec "$venv/bin/python" -m pytest -n "${DIFUSAL_TEST_WORKERS:-2}" --dist load --maxschedchunk 1 "$@" ;;
  *)    exec "$venv/bin/difusal" "$cmd" "$@" ;;
esac
