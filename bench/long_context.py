"""Longest trainable row: one GPU (checkpointing, optional activation offload) or several (context parallelism).

    python -m bench long --preset 0.5b --method full --seqs 262144,524288 --offload --out <json>
    torchrun --nproc_per_node 2 -m bench long --preset 7b --method lora --seqs 524288 --offload --out <json>
    python -m bench long --preset 0.5b --seqs 32768,65536 --reference   # transformers at the same settings

Per length: one packed row of that many tokens (a single document), a warm-up step (at `--warmup-seq` tokens
when given: Triton autotuning and the allocator need no full-length step) and a timed step (forward, backward,
AdamW) with per-layer activation checkpointing; `--offload` as `enable_activation_offload` (layer inputs in pinned
CPU memory, the MLP in checkpointed chunks). The CUDA allocator runs with expandable segments, as align/ sets it for
long rows. Reports tokens/s, the peak memory (the largest over the ranks) and the memory planner's prediction (one
GPU), or the error (out of memory, or what else stopped the step). `--tiny` runs a 2-layer model on CPU (gloo) as a
smoke test of this benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from align.models import expandable_segments
from bench import common
from model import preset_config
from model.context_parallel import enable_context_parallel, shard
from model.memory import plan
from model.modeling import MLP_CHUNK_TOKENS, configure_backbones


def config(args):
    if args.tiny:
        from model import FalconH1Config
        from tests.conftest import tiny_kwargs

        return FalconH1Config(**tiny_kwargs(max_position_embeddings=1 << 20))
    return preset_config(args.preset, max_position_embeddings=1 << 21)


def build(args, device):
    cfg = config(args)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built on the GPU in bf16: a 7B model in seconds, no fp32 copy on the host
    try:
        with device:
            model = common.new_model(cfg, "reference" if args.reference else "ours")
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


def train_step(args, model, opt, cfg, T, world, device):
    """Forward, backward (gradients averaged over the ranks, as DDP does) and the optimizer step on one row."""
    # PEFT keeps adapters in fp32: run LoRA under bf16 autocast, as the Trainer does with bf16: true
    step_once(model, T, world, device, cfg.vocab_size, autocast=args.method == "lora" and not args.tiny)
    if world > 1:  # each rank's loss is the mean over its half of the row
        for p in opt.param_groups[0]["params"]:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
    opt.step()
    opt.zero_grad(set_to_none=True)


def max_over_ranks(value: float, world: int, device) -> float:
    t = torch.tensor([value], device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def measure(args, model, cfg, T, world, device):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    cuda = device.type == "cuda"
    try:
        warmup = min(T, args.warmup_seq) if args.warmup_seq else T
        train_step(args, model, opt, cfg, warmup, world, device)  # autotuning, the allocator
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        (step_s,) = common.step_times(lambda: train_step(args, model, opt, cfg, T, world, device), 1)
        peak = max_over_ranks(common.peak_gib(), world, device)
        out = dict(tokens_per_s=round(T / step_s), step_s=round(step_s, 3), peak_gib=round(peak, 2))
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


def parser() -> argparse.ArgumentParser:
    ap = common.new_parser("long", __doc__, "0.5b")
    ap.add_argument("--method", choices=("full", "lora"), default="full")
    ap.add_argument("--seqs", default="262144,524288")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--mlp-chunk", type=int, default=None, help="with --offload; 0: whole rows (default 16384)")
    ap.add_argument("--warmup-seq", type=int, default=0, help="warm-up step length (default: the timed length)")
    ap.add_argument("--reference", action="store_true", help="transformers' FalconH1ForCausalLM instead of ours")
    ap.add_argument("--tiny", action="store_true", help="2-layer model on CPU: a smoke test of this benchmark")
    return ap


def setup_processes(args) -> tuple[int, int, torch.device]:
    """(world size, rank, device) of this process; the process group when torchrun started several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo" if args.tiny else "nccl")
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device("cpu") if args.tiny else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        expandable_segments()  # GiB-sized blocks freed layer after layer fragment fixed segments
    return world, rank, device


def report(args, argv, rows, world) -> dict:
    offload = " + offload" if args.offload else ""
    launcher = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
    name = f"longest trainable, {args.preset if not args.tiny else 'tiny'} {args.method}{offload}, {world} GPU(s)"
    record = common.envelope(name, "long", argv, args, launcher=launcher)
    record.update(
        which="transformers" if args.reference else "falcon-align",
        processes=world,
        results=rows,
        longest=max((r["seq"] for r in rows if "error" not in r), default=None),
    )
    common.write_result(args.out, record)
    figures = [[r["seq"], r.get("tokens_per_s", r.get("error")), r.get("step_s"), r.get("peak_gib"),
                r.get("planned_peak_gib")] for r in rows]  # fmt: skip
    title = f"{name}, {record['which']}, {record['card']}: longest {common.cell(record['longest'])}"
    common.print_table(title, ["seq", "tokens/s", "step s", "peak GiB", "planned GiB"], figures)
    return record


def main(argv: list[str]) -> dict | None:
    args = common.parse(parser(), argv)
    world, rank, device = setup_processes(args)
    cfg, model = build(args, device)
    if world > 1:
        if args.reference:
            raise SystemExit("transformers' model has no context parallelism: run --reference on one process")
        enable_context_parallel(model.get_base_model() if args.method == "lora" else model)
    rows = []
    for T in map(int, args.seqs.split(",")):
        rows.append(dict(seq=T, **measure(args, model, cfg, T, world, device)))
        if rank == 0:
            print(json.dumps(rows[-1]), flush=True)
        if "error" in rows[-1]:
            break
    record = report(args, argv, rows, world) if rank == 0 else None
    if world > 1:
        dist.destroy_process_group()
    return record
