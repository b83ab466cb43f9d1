#!/usr/bin/env bash
# Multi-host check on one machine: two JAX processes (CPU, 4 simulated devices each, gloo collectives,
# coordinator on 127.0.0.1 only) restore the same checkpoint onto one global 8-device mesh and must produce
# the same logits (1e-5 relative) and greedy tokens as one process with 8 devices.
#
#   scripts/multihost.sh [--mesh SPEC] [--checkpoint DIR] [--workdir DIR] [--timeout SECONDS]
#
# Without --checkpoint a tiny random checkpoint is written (HF safetensors + its Orbax conversion) and the
# Orbax one is used. Every process runs under `timeout` (default 240 s), so the script always stops by
# itself; it exits 0 only when all three processes agree. Results: WORKDIR/{single,process0,process1}.npz.
#
# The same worker runs unchanged on real multi-host systems; only the launch differs:
#
# - TPU pod slice (e.g. v5p-16, v5e-16): run the worker on every host at once; jax.distributed.initialize()
#   finds the coordinator and the process ids itself, and the checkpoint must be readable by every host
#   (a gs:// bucket or a shared filesystem; Orbax reads each host's blocks only):
#     gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \
#       "cd qwen2-jax && python scripts/multihost_worker.py run --auto-distributed \
#          --checkpoint /mnt/ckpt/qwen2-57b --mesh expert=4,tensor=4 --out /tmp/out.npz"
# - Several GPU hosts (one process per host, all its GPUs): host 0 is the coordinator; on host i of N:
#     python scripts/multihost_worker.py run --coordinator HOST0:1234 --num-processes N --process-id i \
#       --checkpoint /shared/qwen2-57b --mesh expert=4,tensor=4 --out /tmp/out-$i.npz
#   (under SLURM or Open MPI, --auto-distributed detects all three). Put `tensor` inside a host (NVLink) and
#   `expert`/`data` across hosts: on GPUs make_mesh orders devices process by process, so the last axis
#   (tensor) is the one that stays inside a host when it is no larger than the GPUs per host.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
WORKER=scripts/multihost_worker.py
MESH="data=2,expert=2,tensor=2"
CHECKPOINT=""
WORKDIR=""
TIMEOUT=240

while [ $# -gt 0 ]; do
  case "$1" in
    --mesh) MESH=$2; shift 2 ;;
    --checkpoint) CHECKPOINT=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "multihost.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$WORKDIR" ]; then WORKDIR=$(mktemp -d -t qwen2-jax-multihost.XXXXXX); fi
mkdir -p "$WORKDIR"

PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

if [ -z "$CHECKPOINT" ]; then
  timeout "$TIMEOUT" "$PYTHON" "$WORKER" checkpoint "$WORKDIR/checkpoint"
  CHECKPOINT="$WORKDIR/checkpoint/orbax"
fi

# A free port on the loopback interface for the coordination service (nothing listens beyond 127.0.0.1).
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
run=("$PYTHON" "$WORKER" run --checkpoint "$CHECKPOINT" --mesh "$MESH")

# The reference (one process, 8 devices) and the two processes run side by side.
timeout "$TIMEOUT" "${run[@]}" --cpu-devices 8 --out "$WORKDIR/single.npz" >"$WORKDIR/single.log" 2>&1 &
PIDS+=($!)
for i in 0 1; do
  timeout "$TIMEOUT" "${run[@]}" --cpu-devices 4 --coordinator "127.0.0.1:$PORT" --num-processes 2 \
    --process-id "$i" --timeout "$TIMEOUT" --out "$WORKDIR/process$i.npz" >"$WORKDIR/process$i.log" 2>&1 &
  PIDS+=($!)
done

status=0
names=(single process0 process1)
for k in 0 1 2; do
  if ! wait "${PIDS[$k]}"; then
    echo "multihost.sh: ${names[$k]} failed (log: $WORKDIR/${names[$k]}.log):" >&2
    grep -v '^\[Gloo\]' "$WORKDIR/${names[$k]}.log" | tail -n 5 >&2
    status=1
  fi
done
PIDS=()
[ $status -eq 0 ] || exit $status
grep -h '^process' "$WORKDIR/single.log" "$WORKDIR/process0.log" "$WORKDIR/process1.log"
"$PYTHON" "$WORKER" compare "$WORKDIR/single.npz" "$WORKDIR/process0.npz" "$WORKDIR/process1.npz"
