#!/usr/bin/env bash
# Long-context benchmarks on a GPU machine without network access: installs the mamba-ssm wheel from .whl (the
# Triton scan), then runs bench/long_context.py once per argument string, each under its own timeout; JSON and logs
# land in $OUT.
#   bash bench/long_context_run.sh "--preset 0.5b --seqs 524288 --offload --warmup-seq 16384" "--reference ..."
#   LAUNCH="torchrun --nproc_per_node 2" bash bench/long_context_run.sh "--preset 7b --method lora ..."
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T=/tmp/deps/site-packages
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $T .whl/mamba_ssm-*.whl \
  || exit 1
# autotune results on disk (Triton ≥ 3.2): the next process on this machine skips mamba-ssm's autotuning
# expandable segments: at 512K the backward's GiB-sized blocks left 15 GiB reserved but unusable (fragmentation)
export PYTHONPATH=$T:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1 PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
n=0
for args in "$@"; do
  n=$((n + 1))
  while [ -e "$OUT/long$n.json" ] || [ -e "$OUT/long$n.log" ]; do n=$((n + 1)); done  # a second invocation into the same $OUT
  start=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-330}" ${LAUNCH:-python3} bench/long_context.py $args --out "$OUT/long$n.json" \
    > "$OUT/long$n.log" 2>&1
  echo "[$n] rc=$? $(($(date +%s) - start))s: $args"
  grep -E '^\{"seq"' "$OUT/long$n.log" || tail -4 "$OUT/long$n.log"
done
