#!/usr/bin/env bash
# DPO on a GPU machine without network access: installs the wheels in .whl (trl, datasets, mamba-ssm, ...), runs
# the GPU tests for the padding-free path, then the DPO throughput bench (ours vs TRL + transformers). Logs and JSON
# land in $OUT.
#   bash bench/dpo_device_run.sh [dpo_bench.py args]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T=/tmp/deps/site-packages  # a "site-packages" path: datasets' dill pickles other module paths by value
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $T .whl/*.whl || exit 1
export PYTHONPATH=$T:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRITON_CACHE_AUTOTUNING=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/model/test_gpu.py -k "${TESTS:-padding_free or whole_model or packed}" \
  > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log"
timeout "${BENCH_TIMEOUT:-420}" python3 bench/dpo_bench.py --out "$OUT/dpo_bench.json" "$@" > "$OUT/dpo_bench.log" 2>&1
echo "bench rc=$?"
grep -E "^(ours|reference) " "$OUT/dpo_bench.log"
grep -E '"speedup"' "$OUT/dpo_bench.json"
