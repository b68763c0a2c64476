#!/usr/bin/env bash
# N cooperating processes on this machine over loopback (what a pod does across hosts; for trying a
# multi-process setup on one CPU box). Each process gets --cpu-devices CPU devices; process 0 writes the run.
# Usage: train/launch_local.sh N CONFIG.yaml [--set key=value ...]
set -euo pipefail
n=$1 config=$2
shift 2
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for ((i = 0; i < n; i++)); do
  jaxpeft train "$config" --coordinator "127.0.0.1:$port" --num-processes "$n" --process-id "$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
