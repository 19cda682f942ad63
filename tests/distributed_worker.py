"""Worker of tests/test_distributed.py's launcher test: joins the other processes and prints the process info.

Started by launch/local_multiprocess.sh (RPOREC_COORDINATOR / RPOREC_NUM_PROCESSES / RPOREC_PROCESS_ID set), it
prints one line `RESULT {json}` with this process's index and the process and device counts.
`--fail-process K` makes process K exit with status 3 before joining (the others then wait for it).
"""

import json
import os
import sys

# Importing creates no JAX state; initialize() in main() runs before any JAX call, as JAX requires.
from rporec_jax import distributed


def main(argv: list[str]) -> None:
    fail = argv[argv.index("--fail-process") + 1] if "--fail-process" in argv else None
    if fail is not None and os.environ.get(distributed.ENV_PROCESS_ID) == fail:
        sys.exit(3)
    info = distributed.initialize(distributed.DistributedConfig(timeout_s=60))
    print("RESULT " + json.dumps(info), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
