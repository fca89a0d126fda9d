"""DPO throughput: falcon-align's pipeline against plain TRL + transformers' FalconH1ForCausalLM, same run, same
weights.

    python -m bench dpo --preset 0.5b --pairs-per-step 8 --steps 20 --warmup 5 --out <json>

Both sides train full fine-tuning with a reference model held in memory (its forward runs every step), bf16,
AdamW, TRL's `sigmoid_norm` (= dpo_norm) loss, on the same synthetic preference pairs of varied lengths (prompts
and completions drawn like an instruction-tuning set). Ours: `FalconDPOTrainer` with padding-free pairs on our
model and kernels. Reference: TRL's `DPOTrainer` (padded batches) on transformers' `FalconH1ForCausalLM` with the
same state dict. Reported: pairs/s and real tokens/s (median step after warm-up), peak memory, the speedup.
Random weights are fine: the shapes are real.
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from align.offline.base import build_tokenizer
from bench import common
from model import preset_config
from model.kernels import get_ops

WORDS = "the a model token layer state scan attention memory fast slow river cloud seven green answer data".split()


def synthetic_pairs(n, seed=0, prompt=(32, 384), completion=(16, 384)):
    """Text pairs whose word counts follow uniform ranges, like a mixed instruction set."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"prompt": text(*prompt), "chosen": text(*completion), "rejected": text(*completion)} for _ in range(n)]


def dpo_config(side, args):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=f"/tmp/dpo_bench_{side}",
        per_device_train_batch_size=args.pairs_per_step,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-6,
        bf16=True,
        gradient_checkpointing=False,
        loss_type=["sigmoid_norm"],
        beta=5.0,
        max_length=args.max_length,
        padding_free=side == "ours",
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


def run(side, model, ref_model, tokenizer, pairs, args):
    """One side's training → pairs/s, real tokens/s, step time, peak memory (or the error)."""
    from datasets import Dataset
    from trl import DPOTrainer

    from align.preference import FalconDPOTrainer

    timer = common.StepTimer()
    trainer_cls = FalconDPOTrainer if side == "ours" else DPOTrainer
    trainer = trainer_cls(
        model=model,
        ref_model=ref_model,
        args=dpo_config(side, args),
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    lengths = [
        min(len(r["prompt_ids"]) + len(r[k]), args.max_length)
        for r in trainer.train_dataset
        for k in ("chosen_ids", "rejected_ids")
    ]
    torch.cuda.reset_peak_memory_stats()
    try:
        trainer.train()
    except torch.OutOfMemoryError:
        return dict(error="out of memory")
    step = timer.median_step_s(args.warmup)
    tokens_per_pair = sum(lengths) / len(lengths) * 2
    return dict(
        pairs_per_s=round(args.pairs_per_step / step, 2),
        real_tokens_per_s=round(args.pairs_per_step * tokens_per_pair / step),
        step_s=round(step, 4),
        peak_gib=common.peak_gib(),
        mean_tokens_per_pair=round(tokens_per_pair, 1),
    )


def models(cfg, side, state):
    """(policy, frozen reference model) of one side, both from the same weights → and the weights."""
    if side == "ours":
        model, ref = common.build(cfg, "ours"), common.build(cfg, "ours")
        state = model.state_dict()
    else:
        state = state if state is not None else common.build(cfg, "ours").state_dict()
        model, ref = common.build(cfg, "reference", state), common.build(cfg, "reference", state)
    ref.eval().requires_grad_(False)
    return model, ref, state


def parser() -> argparse.ArgumentParser:
    ap = common.new_parser("dpo", __doc__, "0.5b")
    ap.add_argument("--pairs-per-step", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--sides", default="ours,reference")
    return ap


def main(argv: list[str]) -> dict:
    args = common.parse(parser(), argv)
    pairs = synthetic_pairs(args.pairs_per_step * (args.warmup + args.steps))
    tokenizer = build_tokenizer([p["prompt"] for p in pairs[:200]], vocab_size=600)  # whole words: ~1 token each
    cfg = preset_config(args.preset)
    sides, state = {}, None
    for side in args.sides.split(","):
        common.cleanup()
        model, ref, state = models(cfg, side, state)
        sides[side] = run(side, model, ref, tokenizer, pairs, args)
        print(side, json.dumps(sides[side]), flush=True)
        del model, ref
    name = f"DPO throughput, {args.preset} preset, full fine-tune with a reference model"
    record = common.envelope(name, "dpo", argv, args)
    record.update(kernels=get_ops("cuda").name, setup={k: v for k, v in vars(args).items() if k != "commit"})
    record.update(sides)
    ours, ref = sides.get("ours", {}), sides.get("reference", {})
    if "pairs_per_s" in ours and "pairs_per_s" in ref:
        record["speedup"] = round(ours["pairs_per_s"] / ref["pairs_per_s"], 2)
    common.write_result(args.out, record)
    figures = [[side, r.get("pairs_per_s", r.get("error")), r.get("real_tokens_per_s"), r.get("step_s"),
                r.get("peak_gib")] for side, r in sides.items()]  # fmt: skip
    title = f"DPO, {args.preset}, {record['card']}: speedup {common.cell(record.get('speedup'))}"
    common.print_table(title, ["side", "pairs/s", "real tokens/s", "step s", "peak GiB"], figures)
    return record
