#!/usr/bin/env bash
# Quickstart demo on a CPU machine: builds the built-in data + tokenizer,
# pretrains SimVLM-Tiny on 8 simulated devices (data=4 x fsdp=2), evaluates
# zero-shot captioning on the held-out split, exports, writes an HTML report.
# Outputs go to demo_out/; the last line is one JSON summary. Extra args are
# passed to simvlm_jax.main (e.g. --gin.NUM_STEPS=300).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_env.sh
ensure_venv
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
exec "$VENV/bin/python" -m simvlm_jax.main --gin_file=gin/demo.gin \
  --mode=prepare,train,eval,export --gin.make_mesh.fsdp=2 --print_json "$@"
