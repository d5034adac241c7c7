#!/usr/bin/env bash
# The one place for simvlm_jax's GPU runtime settings: sourced by the GPU image
# (launch/docker/Dockerfile.gpu), the SLURM batch script and the xpk GPU command
# (python -m simvlm_jax.launch slurm|xpk). A variable you set before sourcing wins; XLA_FLAGS
# you set are kept and come after these (the last occurrence of a flag counts).

# Overlap collectives with compute: XLA's latency-hiding scheduler, pipelined FSDP
# all-gathers / reduce-scatters / all-reduces across scanned layers, double-buffered loops.
# Combine small collectives into large ones (fewer NCCL launches). Command buffers (CUDA
# graphs) stay at XLA's default.
_simvlm_xla_flags=(
  --xla_gpu_enable_latency_hiding_scheduler=true
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  --xla_gpu_enable_while_loop_double_buffering=true
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864
)
export XLA_FLAGS="${_simvlm_xla_flags[*]}${XLA_FLAGS:+ $XLA_FLAGS}"
unset _simvlm_xla_flags
# Let JAX's allocator take 90% of each GPU (default 75%); the rest is for NCCL and cuDNN.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
# One hardware queue per device keeps compute and NCCL kernels in the scheduler's order.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# NCCL prints warnings (set NCCL_DEBUG=INFO to see the rings/trees and transports it picks).
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
