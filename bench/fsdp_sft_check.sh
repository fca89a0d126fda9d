#!/usr/bin/env bash
# SFT of the 0.5B preset through `accelerate launch`: one GPU vs FSDP2 on two, same global batch; prints the
# first losses of both. Run on a 2-GPU machine from the repo root (wheels for trl/datasets in .whl if missing).
# FALCON_ALIGN_KERNELS=ref keeps Triton autotuning out of a short run; the comparison is about sharding.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  # the folder name must contain "site-packages": dill (datasets' fingerprinting) pickles modules found anywhere
  # else by value and dies on pyarrow's MonthDayNano
  T=/tmp/deps/site-packages
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $T .whl/*.whl || exit 1
  export PYTHONPATH=$T:$PWD
fi
export PYTHONUNBUFFERED=1 FALCON_ALIGN_KERNELS=${FALCON_ALIGN_KERNELS:-ref} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 - <<'PY' || exit 1
from align.offline.base import build_tokenizer
from align.offline.tasks import examples, pretraining_documents
texts = pretraining_documents(1000) + [m["content"] for r in examples("train") for m in r["messages"]]
build_tokenizer(texts).save_pretrained("/tmp/tok")
PY
COMMON="--config recipes/tiny/sft.yaml --init_preset 0.5b --model_name_or_path /tmp/tok --dtype bfloat16
  --use_cpu False --bf16 True --max_steps 3 --logging_steps 1 --save_strategy no --max_length 2048
  --learning_rate 1e-4 --report_to none --disable_tqdm True --seed 0"
# one visible GPU: with two, HF Trainer wraps the model in nn.DataParallel, which SFTTrainer refuses
CUDA_VISIBLE_DEVICES=0 timeout "${SINGLE_TIMEOUT:-200}" accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \
  align/sft.py $COMMON --output_dir /tmp/single --per_device_train_batch_size 2 > "$OUT/single.log" 2>&1
echo "single-GPU rc=$?"
timeout "${FSDP_TIMEOUT:-240}" accelerate launch --config_file recipes/accelerate_configs/fsdp2.yaml --num_processes 2 \
  --fsdp_cpu_ram_efficient_loading false align/sft.py $COMMON --output_dir /tmp/fsdp \
  --per_device_train_batch_size 1 > "$OUT/fsdp.log" 2>&1
echo "FSDP2 rc=$?"
echo "single-GPU:"; grep -ho "{'loss'[^}]*}" "$OUT/single.log" | head -3
echo "FSDP2 x2:"; grep -ho "{'loss'[^}]*}" "$OUT/fsdp.log" | head -3
grep -h "Error\|error" "$OUT/fsdp.log" | tail -5
