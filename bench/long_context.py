"""Longest trainable sequence: one GPU (checkpointing, optional activation offload) or several (context parallelism).

    python bench/long_context.py --preset 0.5b --method full --seqs 262144,524288 --offload --out <json>
    torchrun --nproc_per_node 2 bench/long_context.py --preset 7b --method lora --seqs 524288 --offload --out <json>
    python bench/long_context.py --preset 0.5b --seqs 32768,65536 --reference   # transformers at the same settings

Per length: one packed row of that many tokens (a single document), a warm-up step (at `--warmup-seq` tokens
when given: Triton autotuning and the allocator need no full-length step) and a timed step (forward, backward,
AdamW) with per-layer activation checkpointing; `--offload` as `enable_activation_offload` (layer inputs in pinned
CPU memory, the MLP in checkpointed chunks). Reports tokens/s, the peak memory (the largest over the ranks) and the
memory planner's prediction (one GPU), or the error (out of memory, or what else stopped the step). `--tiny` runs
a 2-layer model on CPU (gloo) as a smoke test of the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# transformers resolves its Mamba-2 kernels on import: import it before falcon-align registers mamba-ssm without
# its CUDA extension, so the reference takes its PyTorch path (its fused path needs causal-conv1d; see
# docs/performance.md, DPO)
import transformers.models.falcon_h1.modeling_falcon_h1  # noqa: E402, F401

from model import FalconH1ForCausalLM, preset_config  # noqa: E402
from model.context_parallel import enable_context_parallel, shard  # noqa: E402
from model.memory import plan  # noqa: E402
from model.modeling import MLP_CHUNK_TOKENS, configure_backbones  # noqa: E402


def build(args, device):
    torch.manual_seed(0)
    if args.tiny:
        from model import FalconH1Config
        from tests.conftest import tiny_kwargs

        cfg = FalconH1Config(**tiny_kwargs(max_position_embeddings=1 << 20))
    else:
        cfg = preset_config(args.preset, max_position_embeddings=1 << 21)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built on the GPU in bf16: a 7B model in seconds, no fp32 copy on the host
    try:
        with device:
            if args.reference:
                from transformers import FalconH1Config as HFConfig
                from transformers import FalconH1ForCausalLM as HFModel

                skip = ("architectures", "transformers_version", "model_type")
                model = HFModel(HFConfig(**{k: v for k, v in cfg.to_dict().items() if k not in skip}))
            else:
                model = FalconH1ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to(device, dtype)
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        from align.args import SAFE_LORA_TARGETS

        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=128, target_modules=SAFE_LORA_TARGETS))
    reentrant = args.offload  # offloaded checkpoints need the inputs saved through autograd's hooks
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if args.offload and not args.reference:
        chunk = args.mlp_chunk if args.mlp_chunk is not None else MLP_CHUNK_TOKENS
        configure_backbones(model, offload_activations=True, mlp_chunk_tokens=chunk or None)
    model.train()
    return cfg, model


def step_once(model, T, world, device, vocab, autocast):
    ids = torch.randint(1, vocab, (1, T), device=device, generator=torch.Generator(device).manual_seed(0))
    pos = torch.arange(T, device=device)[None]
    inputs = shard(ids, pos, ids) if world > 1 else {"input_ids": ids, "labels": ids}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(**inputs).loss
    loss.backward()
    return loss


def _where(err: BaseException) -> str:
    """The innermost frame of this project where the error arose: file:line function."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/model/" in f.filename or "/bench/" in f.filename]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}" if frames else ""


def measure(args, model, cfg, T, world, device):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    cuda = device.type == "cuda"
    try:
        times = []
        warmup = min(T, args.warmup_seq) if args.warmup_seq else T
        for length in (warmup, T):  # warm-up (autotuning, allocator), then the timed step
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            # PEFT keeps adapters in fp32: run LoRA under bf16 autocast, as the Trainer does with bf16: true
            step_once(model, length, world, device, cfg.vocab_size, autocast=args.method == "lora" and not args.tiny)
            if world > 1:  # each rank's loss is the mean over its half of the row: average, as DDP does
                for p in opt.param_groups[0]["params"]:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], device=device)
        if world > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        out = dict(tokens_per_s=round(T / times[-1]), step_s=round(times[-1], 3), peak_gib=round(float(peak), 2))
    except torch.OutOfMemoryError as err:  # keep what it tried to allocate and what was held
        out = dict(error="out of memory", detail=" ".join(str(err).split())[:400], where=_where(err))
    except Exception as err:  # the reference's checkpointing path has crashed before: record, go on
        out = dict(error=f"{type(err).__name__}: {str(err)[:300]}")
    finally:
        opt.state.clear()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
    if world == 1 and cuda and not args.reference:
        card = torch.cuda.get_device_properties(device).total_memory / 2**30
        out["planned_peak_gib"] = plan(cfg, args.method, card, args.offload, seq=T).peak_gib_at_seq
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.5b")
    ap.add_argument("--method", choices=("full", "lora"), default="full")
    ap.add_argument("--seqs", default="262144,524288")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--mlp-chunk", type=int, default=None, help="with --offload; 0: whole rows (default 16384)")
    ap.add_argument("--warmup-seq", type=int, default=0, help="warm-up step length (default: the timed length)")
    ap.add_argument("--reference", action="store_true", help="transformers' FalconH1ForCausalLM instead of ours")
    ap.add_argument("--tiny", action="store_true", help="2-layer model on CPU: a smoke test of this script")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo" if args.tiny else "nccl")
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device("cpu") if args.tiny else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg, model = build(args, device)
    if world > 1:
        if args.reference:
            raise SystemExit("transformers' model has no context parallelism: run --reference on one process")
        enable_context_parallel(model.get_base_model() if args.method == "lora" else model)
    rows = []
    for T in map(int, args.seqs.split(",")):
        result = dict(seq=T, **measure(args, model, cfg, T, world, device))
        rows.append(result)
        if rank == 0:
            print(json.dumps(result), flush=True)
        if "error" in result:
            break
    if rank == 0:
        offload = " + offload" if args.offload else ""
        record = dict(
            name=f"longest trainable, {args.preset} {args.method}{offload}, {world} GPU(s)",
            which="transformers" if args.reference else "falcon-align",
            card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            date=datetime.date.today().isoformat(),
            command=" ".join(sys.argv),
            processes=world,
            results=rows,
            longest=max((r["seq"] for r in rows if "error" not in r), default=None),
        )
        print(json.dumps(record, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
