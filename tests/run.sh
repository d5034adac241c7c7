#!/usr/bin/env bash
# The test command: creates .venv if missing, installs simvlm_jax with its test
# extra and the open_clip parity stack (tests/install_parity.sh), then runs pytest
# on 8 simulated CPU devices, two workers. Extra args go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_env.sh
ensure_venv test
# The open_clip parity/export tests need torch (CPU) + open_clip at pinned versions.
if [[ ! -f "$VENV/.parity_installed" || tests/install_parity.sh -nt "$VENV/.parity_installed" ]]; then
  echo "Installing the open_clip parity stack (torch CPU) into $VENV" >&2
  VENV="$VENV" bash tests/install_parity.sh
  touch "$VENV/.parity_installed"
fi
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export PYTHONHASHSEED=0
# Two pytest workers (one per core here; PYTEST_WORKERS=0 runs in this process), each test
# file on one worker so its module fixtures (generated data, compiled models) are built once,
# files handed out in collection order (longest first: tests/conftest.py LONGEST_FIRST).
WORKERS="${PYTEST_WORKERS:-2}"
XDIST=()
[[ "$WORKERS" != 0 ]] && XDIST=(-n "$WORKERS" --dist loadfile --no-loadscope-reorder)
# One persistent JAX compilation cache per test run, shared by the CLI subprocesses that opt in
# (tests/conftest.py compile_cache_env), removed at the end.
SIMVLM_TEST_COMPILE_CACHE="$(mktemp -d "${TMPDIR:-/tmp}/simvlm_jax_cache.XXXXXX")"
export SIMVLM_TEST_COMPILE_CACHE
trap 'rm -rf "$SIMVLM_TEST_COMPILE_CACHE"' EXIT
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "${XDIST[@]}" tests "$@"
