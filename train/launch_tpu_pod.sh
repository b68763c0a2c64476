#!/usr/bin/env bash
# Train on every host of a Cloud TPU pod slice: one `jaxpeft train` process per host, joined by
# jax.distributed from the TPU VM's own environment (--distributed); only process 0 writes the run folder,
# which must be on storage all hosts share (or a gs:// path Orbax can write).
# Usage: train/launch_tpu_pod.sh TPU_NAME ZONE CONFIG.yaml [--set key=value ...]
# Setup once on every host: git clone <this repo> jaxpeft && cd jaxpeft && python3 -m venv .venv &&
#   .venv/bin/pip install -e ".[tpu]"
set -euo pipefail
name=$1 zone=$2 config=$3
shift 3
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  --command "cd jaxpeft && .venv/bin/jaxpeft train $config --distributed $*"
