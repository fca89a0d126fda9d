#!/usr/bin/env bash
# One device call: install carried wheels, optionally run GPU tests, then the benchmark. On the GPU machine:
#   TESTS="-k pattern" bash bench/device_run.sh "<bench.py args>"
# Everything is logged under $OUT; the Triton cache is packed to $OUT so the next call can carry it (.triton).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
# autotune results on disk too (Triton ≥ 3.2): mamba-ssm autotunes every kernel per shape, minutes per process
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton/cache TRITON_CACHE_AUTOTUNING=1
[ -f .carry/triton_cache.tgz ] && tar xzf .carry/triton_cache.tgz -C "$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -n "${TESTS:-}" ]; then  # TESTS: a pytest -k expression, or "all"
  K=(); [ "$TESTS" != all ] && K=(-k "$TESTS")
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider tests/model/test_gpu.py "${K[@]}" \
    > "$OUT/gpu_tests.log" 2>&1
  tail -5 "$OUT/gpu_tests.log"
fi
n=0
for args in "$@"; do  # one bench.py run per argument string, each under its own timeout
  n=$((n + 1))
  timeout "${BENCH_TIMEOUT:-400}" python3 bench/bench.py $args > "$OUT/bench$n.log" 2>&1
  tail -8 "$OUT/bench$n.log"
done
tar czf "$OUT/triton_cache.tgz" .triton  # carry it next time as .carry/triton_cache.tgz (16 MiB at most back)
ls -la "$OUT"
