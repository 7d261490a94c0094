#!/usr/bin/env bash
# Start one clef_jax.train process of a multi-node job without SLURM; run it once per process.
#
#   COORDINATOR_ADDRESS=10.0.0.1:12345 NUM_PROCESSES=2 PROCESS_ID=0 \
#       launch/multinode.sh --config configs/clef.py:large --workdir /shared/runs/x
#   (and PROCESS_ID=1 on the second node, same everything else)
#
# Environment: COORDINATOR_ADDRESS (host:port of process 0, reachable from every node),
# NUM_PROCESSES, PROCESS_ID (0 .. NUM_PROCESSES-1); optional LOCAL_DEVICE_IDS (e.g. 0,1 when a
# node runs one process per GPU), PYTHON (default python). They become --config.distributed.*
# overrides; other arguments go to `python -m clef_jax.train`. On GPUs, see the NCCL notes in
# launch/slurm/train.sbatch; on CPU, set JAX_PLATFORMS=cpu (gloo collectives are switched on).
set -euo pipefail

usage() { sed -n '2,11p' "${BASH_SOURCE[0]}"; }
if [ "$#" -eq 0 ]; then usage >&2; exit 2; fi
if [ "$1" = "--help" ] || [ "$1" = "-h" ]; then usage; exit 0; fi

: "${COORDINATOR_ADDRESS:?set COORDINATOR_ADDRESS=host:port of process 0 (see --help)}"
: "${NUM_PROCESSES:?set NUM_PROCESSES to the number of processes in the job (see --help)}"
: "${PROCESS_ID:?set PROCESS_ID to this process number, 0 .. NUM_PROCESSES-1 (see --help)}"

overrides=(
    --config.distributed.mode=on
    "--config.distributed.coordinator_address=${COORDINATOR_ADDRESS}"
    "--config.distributed.num_processes=${NUM_PROCESSES}"
    "--config.distributed.process_id=${PROCESS_ID}"
)
if [ -n "${LOCAL_DEVICE_IDS:-}" ]; then
    overrides+=("--config.distributed.local_device_ids=(${LOCAL_DEVICE_IDS},)")
fi
exec "${PYTHON:-python}" -m clef_jax.train "$@" "${overrides[@]}"
