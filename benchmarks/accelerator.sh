#!/usr/bin/env bash
# The speed benchmarks on an accelerator, unchanged scripts, one log per benchmark under $OUT (default
# runs/bench). MODEL: an HF dir or .gguf (default: the SmolLM2-135M-Instruct GGUF); where the weights cannot be
# fetched, `python benchmarks/random_model.py DIR --like CONFIG_DIR` writes random ones of the same shapes.
#     bash benchmarks/accelerator.sh [MODEL]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench}
mkdir -p "$OUT"
model=(); [[ $# -gt 0 ]] && model=(--model "$1")
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
run() {  # name, command...: runs it, keeps the log, prints its table
  local name=$1; shift
  echo "=== $name"
  "$@" > "$OUT/$name.log" 2>&1; echo "exit $?"
  grep -v "Loading\|shards\|it/s\]" "$OUT/$name.log" | tail -"${TAILN:-12}"
}
run parity python benchmarks/parity.py "${model[@]}"
run sampler_fp32 python benchmarks/sampler.py "${model[@]}"
TAILN=14 run grpo_step python benchmarks/grpo_step.py "${model[@]}"
run sampler_bf16 python benchmarks/sampler.py "${model[@]}" --dtype bfloat16
