#!/usr/bin/env bash
# One device call: install carried wheels, run the benchmarks, then optionally the GPU tests (test_gpu.py and the
# GPU cases of test_context_parallel.py; the other test modules need trl). On the GPU machine:
#   TESTS="-k pattern" bash bench/device_run.sh "<bench.py args>" ...
# Wheels from $WHEELS (default .whl; mamba-ssm alone is enough for the bench and the GPU tests). Everything is logged
# under $OUT; the Triton cache (autotuning included) comes back in 15 MiB parts: carry them next time in .carry/.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS:-.whl}"/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
# autotune results on disk too (Triton ≥ 3.2): mamba-ssm autotunes every kernel per shape, minutes per process
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton/cache TRITON_CACHE_AUTOTUNING=1
ls .carry/triton_cache.tgz.* >/dev/null 2>&1 && cat .carry/triton_cache.tgz.* | tar xz -C "$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
n=0
for args in "$@"; do  # one bench.py run per argument string, each under its own timeout; leading KEY=VALUE words
  n=$((n + 1))       # are its environment (an A/B switch such as FALCON_ALIGN_FUSE_PROJECTIONS=0)
  read -ra words <<< "$args"; envs=()
  while [[ ${words[0]:-} =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do envs+=("${words[0]}"); words=("${words[@]:1}"); done
  timeout "${BENCH_TIMEOUT:-400}" env "${envs[@]}" python3 bench/bench.py "${words[@]}" > "$OUT/bench$n.log" 2>&1
  grep -E '^\{"seq"' "$OUT/bench$n.log" | cut -c1-200; tail -6 "$OUT/bench$n.log"
done
if [ -n "${TESTS:-}" ]; then  # TESTS: a pytest -k expression, or "all"
  K=(); [ "$TESTS" != all ] && K=(-k "$TESTS")
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -v -p no:cacheprovider -m gpu tests/model/test_gpu.py \
    tests/model/test_context_parallel.py "${K[@]}" \
    > "$OUT/gpu_tests.log" 2>&1
  grep -E " (PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/gpu_tests.log" | cut -c1-150 | tail -40
fi
tar czf - .triton | split -b 15M - "$OUT/triton_cache.tgz."  # files come back at 16 MiB at most
ls -la "$OUT"
