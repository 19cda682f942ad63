#!/usr/bin/env bash
# Runs N processes of `python -m rporec_jax.launch ARGS` on this machine as one multi-process JAX job on
# fake CPU devices: the way to test multi-host code paths without a cluster.
#
#   launch/local_multiprocess.sh N [args...]
#
# Environment (all optional):
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 2: each "host" has several chips)
#   PORT                 coordinator port on localhost (default: a free one)
#   PYTHON               interpreter (default: python)
#   RPOREC_MODULE        module to run (default: rporec_jax.launch)
# Output lines are prefixed with [process id]. Exits non-zero if any process fails; the others are stopped
# then, since they would otherwise wait for the missing peer until the start-up timeout.
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N [args for python -m ${RPOREC_MODULE:-rporec_jax.launch}...]" >&2
  exit 2
fi
N=$1
shift
PYTHON=${PYTHON:-python}
MODULE=${RPOREC_MODULE:-rporec_jax.launch}
DEVICES=${DEVICES_PER_PROCESS:-2}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < N; i++)); do
  # $! is the Python process itself (the prefixing sed runs in process substitutions), so stop_all reaches it.
  RPOREC_COORDINATOR="localhost:$PORT" RPOREC_NUM_PROCESSES="$N" RPOREC_PROCESS_ID="$i" \
    JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES" \
    "$PYTHON" -m "$MODULE" "$@" > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=("$!")
done

# Poll rather than `wait -n`, which older bash (macOS) lacks.
status=0
running=$N
while ((running > 0)); do
  running=0
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ -z $pid ]] && continue
    if kill -0 "$pid" 2>/dev/null; then
      running=$((running + 1))
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    pids[$i]=""
    if ((rc != 0)); then
      echo "local_multiprocess: process $i exited with status $rc; stopping the others" >&2
      status=1
      stop_all
    fi
  done
  ((running > 0)) && sleep 0.2
done
exit "$status"
