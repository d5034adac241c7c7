#!/usr/bin/env bash
# The test command: creates .venv if missing, installs simvlm_jax with its test
# extra, then runs pytest on 8 simulated CPU devices. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_env.sh
ensure_venv test
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export PYTHONHASHSEED=0
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
