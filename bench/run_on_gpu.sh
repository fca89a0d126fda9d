#!/usr/bin/env bash
# Benchmarks and the GPU tests on a GPU machine, also one without network access. From the repository root:
#
#   bash bench/run_on_gpu.sh [options] "<benchmark> [its options]" ...
#
#   bash bench/run_on_gpu.sh --wheels wheels/ "train --preset 0.5b --seqs 8192 --graphs --compile-layers" "dpo"
#   bash bench/run_on_gpu.sh --launch "torchrun --nproc_per_node 2" "long --preset 7b --method lora --seqs 524288 --offload"
#   bash bench/run_on_gpu.sh "train --preset 1.5b-deep --seqs 8192 --runtime '{\"mixer_streams\": false}'"
#   bash bench/run_on_gpu.sh "fsdp-sft"              # FSDP2 on two GPUs against one (a host with 2 GPUs)
#   bash bench/run_on_gpu.sh --gpu-test              # make gpu-test: JUnit XML + summary in bench/results/
#
# Options:
#   --wheels DIR   first pip-install the wheels in DIR (no index, no dependencies) into a folder on PYTHONPATH: what
#                  the machine's python lacks (mamba-ssm for the fast kernels; trl, peft and datasets for dpo,
#                  user-paths, fsdp-sft and the GPU tests)
#   --out DIR      logs and results (default runs/gpu): <n>-<benchmark>.log and .json per benchmark string,
#                  gpu-tests.log and the GPU test record, autotune.tgz
#   --timeout S    limit of each benchmark and of the GPU tests (default 600)
#   --launch CMD   what runs `-m bench ...` (default python3)
#   --autotune F   an autotune.tgz of an earlier run: Triton then autotunes no kernel twice
#   --gpu-test     also run the GPU tests (`python -m bench gpu-tests --budget <timeout − 30 s>`, in 8 pytest-xdist
#                  workers where pytest-xdist imports), after the benchmarks: a run stopped at its budget still writes
#                  the record of the tests that finished
#
# A benchmark string is a `python -m bench` command without its prefix, split as the shell splits words (quotes
# hold); `--out $OUT/<n>-<benchmark>.json` is added unless it has an --out. Each log ends with the benchmark's table,
# printed here. mamba-ssm autotunes every Triton kernel per shape (minutes a process): Triton keeps the results on
# disk (TRITON_CACHE_AUTOTUNING=1) and they are archived in $OUT/autotune.tgz (kilobytes; the compiled kernels are
# rebuilt in seconds).
set -uo pipefail

OUT=runs/gpu WHEELS="" TIMEOUT=600 LAUNCH=python3 AUTOTUNE="" GPU_TEST=0
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) WHEELS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --launch) LAUNCH=$2; shift 2 ;;
    --autotune) AUTOTUNE=$2; shift 2 ;;
    --gpu-test) GPU_TEST=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)

if [ -n "$WHEELS" ]; then
  # the folder's name must contain "site-packages": datasets' dill pickles modules found anywhere else by value
  SITE=/tmp/bench-deps/site-packages
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=$SITE:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRITON_CACHE_AUTOTUNING=1
CACHE=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
mkdir -p "$CACHE"
if [ -n "$AUTOTUNE" ]; then tar xzf "$AUTOTUNE" -C "$CACHE" || exit 1; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

n=0
for spec in "$@"; do
  n=$((n + 1))
  eval "words=($spec)"  # the user's own quoting, as their shell would read it
  name=${words[0]}
  if [[ " ${words[*]} " != *" --out "* && " ${words[*]} " != *" --out="* ]]; then
    words+=(--out "$OUT/$n-$name.json")
  fi
  start=$SECONDS
  # shellcheck disable=SC2086  # LAUNCH is a command line: "torchrun --nproc_per_node 2"
  timeout "$TIMEOUT" $LAUNCH -m bench "${words[@]}" > "$OUT/$n-$name.log" 2>&1
  echo "[$n] $name: exit $?, $((SECONDS - start)) s ($OUT/$n-$name.log)"
  tail -n 20 "$OUT/$n-$name.log"
done

if [ "$GPU_TEST" = 1 ]; then
  workers=""  # pytest-xdist where installed (a wheel in --wheels): the tests' compilations on 8 cores at once
  if python3 -c "import xdist" 2> /dev/null; then workers="-n 8 tests"; fi
  # shellcheck disable=SC2086  # workers: pytest's arguments
  timeout "$TIMEOUT" python3 -m bench gpu-tests --budget $((TIMEOUT - 30)) $workers > "$OUT/gpu-tests.log" 2>&1
  echo "GPU tests: exit $?"
  tail -n 40 "$OUT/gpu-tests.log"
  cp bench/results/*-gpu-tests-"$(date +%F)".* "$OUT"/ 2>/dev/null
fi

(cd "$CACHE" && find . -name '*.autotune.json' -print0 | tar czf "$OUT/autotune.tgz" --null -T -)
ls -la "$OUT"
