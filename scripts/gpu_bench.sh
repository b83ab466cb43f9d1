#!/usr/bin/env bash
# Full-scale GPU benchmark: Qwen2-57B-A14B with random bf16 weights made on the GPU, decode at batch 1/16/64,
# prefill 2048, time to first token, share of the HBM roofline, the serving engine at 16 slots; then transformers
# against the port at a truncated depth. Self-contained (nothing is downloaded), about 7 minutes on one H200
# (docs/performance.md).
#
#   scripts/gpu_bench.sh [--json gpu_bench.json] [--budget-s 420] [--no-hf] ...   (scripts/gpu_bench.py --help)
#   scripts/gpu_bench.sh --tiny     # the same path on CPU with a tiny config (run by tests/test_bench.py)
#
# Runs from a checkout without installing it (PYTHONPATH); PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
if [[ " $* " == *" --tiny "* ]]; then
    export JAX_PLATFORMS=cpu
else
    # ~115 GB of weights: JAX may take 95% of the H200's memory (its default is 75%), and compiled programs
    # are cached so that a second run starts at once.
    export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
    export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/qwen2-jax-gpu-bench-cache}"
fi
exec "$PY" scripts/gpu_bench.py "$@"
