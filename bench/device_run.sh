#!/usr/bin/env bash
# One device call: install carried wheels, run the GPU tests, then the benchmark. Usage (on the GPU machine):
#   bash bench/device_run.sh "<bench.py args>"
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -p no:cacheprovider tests/model/test_gpu.py 2>&1 | tee "${OUT:-/tmp}/gpu_tests.log" | tail -25
fi
[ -n "${1:-}" ] && python3 bench/bench.py $1
