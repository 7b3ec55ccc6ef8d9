#!/bin/bash
# One Prefect work pool per machine: each GPU machine runs a worker for its own pool, and a deployment's runs go to the pool
# (the machine) it names. Run on each machine with PREFECT_API_URL pointing at the shared Prefect server.
#   infra/prefect/work-pools.sh gpu-a        # on machine gpu-a
set -euo pipefail

POOL=${1:?give the pool name of this machine, e.g. gpu-a}
prefect work-pool create "$POOL" --type process --overwrite
prefect work-pool set-concurrency-limit "$POOL" 1   # one training run per GPU at a time
exec prefect worker start --pool "$POOL" --name "$(hostname)"
