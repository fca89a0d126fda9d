#!/usr/bin/env bash
# On a GPU machine without network access: installs the wheels in $WHEELS, runs the benchmarks (bench.py, or the
# bench script an argument names first), then optionally the GPU tests (test_gpu.py and the GPU cases of
# test_context_parallel.py; the other test modules need trl):
#   TESTS="pattern" bash bench/device_run.sh "<bench.py args>" ...   (TESTS: see below)
# Wheels from $WHEELS (default .whl; mamba-ssm alone is enough for the bench and the GPU tests). Everything is logged
# under $OUT; mamba-ssm's autotuning results are saved as $OUT/autotune.tgz (kilobytes; the compiled kernels, hundreds
# of MB, are rebuilt in seconds): placed at .carry/autotune.tgz, the next run autotunes no kernel twice.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS:-.whl}"/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
# autotune results on disk too (Triton ≥ 3.2): mamba-ssm autotunes every kernel per shape, minutes per process
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton/cache TRITON_CACHE_AUTOTUNING=1
[ -f .carry/autotune.tgz ] && tar xzf .carry/autotune.tgz -C "$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
n=0
for args in "$@"; do  # one bench.py run per argument string, each under its own timeout; leading KEY=VALUE words
  n=$((n + 1))       # are its environment (an A/B switch such as FALCON_ALIGN_FUSE_PROJECTIONS=0)
  read -ra words <<< "$args"; envs=()
  while [[ ${words[0]:-} =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do envs+=("${words[0]}"); words=("${words[@]:1}"); done
  script=bench/bench.py  # or the script the string names first (bench/stream_probe.py ...)
  if [[ ${words[0]:-} == *.py ]]; then script=${words[0]}; words=("${words[@]:1}"); fi
  timeout "${BENCH_TIMEOUT:-400}" env "${envs[@]}" python3 "$script" "${words[@]}" > "$OUT/bench$n.log" 2>&1
  grep -E '^\{"(seq|variant)"' "$OUT/bench$n.log" | cut -c1-300; tail -6 "$OUT/bench$n.log"
done
if [ -n "${TESTS:-}" ]; then  # TESTS: "all", a pytest -k expression, or test ids (tests/...::name ...) run in order
  targets=(tests/model/test_gpu.py tests/model/test_context_parallel.py)
  if [[ $TESTS == tests/* ]]; then read -ra targets <<< "$TESTS"; elif [ "$TESTS" != all ]; then targets+=(-k "$TESTS"); fi
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -v -p no:cacheprovider -m gpu "${targets[@]}" > "$OUT/gpu_tests.log" 2>&1
  grep -E " (PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/gpu_tests.log" | cut -c1-150 | tail -40
fi
find .triton -name '*.autotune.json' -print0 | tar czf "$OUT/autotune.tgz" --null -T -
ls -la "$OUT"
