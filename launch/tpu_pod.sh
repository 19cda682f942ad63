#!/usr/bin/env bash
# Runs `python -m rporec_jax.launch ARGS` on every worker of a Cloud TPU VM (a pod slice) at once.
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh --config configs/xxx.py key=value ...
#
# Environment:
#   TPU_NAME, ZONE  required
#   PROJECT         optional gcloud project
#   REPO_DIR        the repository on every worker, relative to the ssh home (default: rporec_jax); it must
#                   already be checked out and installed there (pip install -e '.[tpu]')
#   PYTHON          interpreter on the workers (default: python3)
# RPOREC_DISTRIBUTED=auto tells rporec_jax.distributed to call jax.distributed.initialize() with no arguments:
# JAX reads the worker list and this worker's index from the TPU VM's metadata.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
REPO_DIR=${REPO_DIR:-rporec_jax}
PYTHON=${PYTHON:-python3}
project=()
[[ -n ${PROJECT:-} ]] && project=(--project "$PROJECT")

# Quote every argument so it reaches the remote shell unchanged.
args=""
(($# > 0)) && args=$(printf ' %q' "$@")
remote="cd $(printf '%q' "$REPO_DIR") && RPOREC_DISTRIBUTED=auto $(printf '%q' "$PYTHON") -m rporec_jax.launch$args"

exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${project[@]}" --worker=all --command "$remote"
