"""DPO throughput: falcon-align's pipeline vs plain TRL + transformers' FalconH1ForCausalLM, same run, same weights.

    python bench/dpo_bench.py --preset 0.5b --pairs-per-step 8 --steps 20 --out bench/results/<name>.json

Both sides train full fine-tuning with a reference model held in memory (the reference forward runs every
step), bf16, AdamW, TRL's `sigmoid_norm` (= dpo_norm) loss, on the same synthetic preference pairs of varied
lengths (prompts and completions drawn like an instruction-tuning set). Ours: `FalconDPOTrainer` with padding-free
pairs on our model and kernels. Reference: TRL's `DPOTrainer` (padded batches) on transformers'
`FalconH1ForCausalLM` with the same state dict. Reported: pairs/s and real tokens/s (median step after warm-up),
peak memory, the speedup. Random weights are fine: the shapes are real.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# transformers resolves its Mamba-2 kernels when this module is imported: import it before falcon-align registers
# mamba-ssm's Triton modules (model/kernels/cuda.py), so the reference gets what a plain install gives. mamba-ssm's
# fused conv+scan training kernel needs causal-conv1d (not built here); with mamba-ssm importable and no
# causal-conv1d, transformers' training forward raises TypeError, so the reference runs its PyTorch path.
import transformers.models.falcon_h1.modeling_falcon_h1  # noqa: E402, F401
from transformers import TrainerCallback  # noqa: E402

from align.offline.base import build_tokenizer  # noqa: E402
from bench import build, cleanup  # noqa: E402
from model import preset_config  # noqa: E402
from model.kernels import get_ops  # noqa: E402

WORDS = "the a model token layer state scan attention memory fast slow river cloud seven green answer data".split()


def synthetic_pairs(n, seed=0, prompt=(32, 384), completion=(16, 384)):
    """Text pairs whose word counts follow uniform ranges, like a mixed instruction set."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"prompt": text(*prompt), "chosen": text(*completion), "rejected": text(*completion)} for _ in range(n)]


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._t = [], None

    def on_step_begin(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


def run(side, model, ref_model, tokenizer, pairs, args):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from align.preference import FalconDPOTrainer

    config = DPOConfig(
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
    timer = StepTimer()
    trainer_cls = FalconDPOTrainer if side == "ours" else DPOTrainer
    trainer = trainer_cls(
        model=model,
        ref_model=ref_model,
        args=config,
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
    step = statistics.median(timer.times[args.warmup :])
    tokens_per_pair = sum(lengths) / len(lengths) * 2
    return dict(
        pairs_per_s=round(args.pairs_per_step / step, 2),
        real_tokens_per_s=round(args.pairs_per_step * tokens_per_pair / step),
        step_s=round(step, 4),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        mean_tokens_per_pair=round(tokens_per_pair, 1),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="0.5b")
    parser.add_argument("--pairs-per-step", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--out", default=None)
    parser.add_argument("--sides", default="ours,reference")
    args = parser.parse_args(argv)

    n_pairs = args.pairs_per_step * (args.warmup + args.steps)
    pairs = synthetic_pairs(n_pairs)
    tokenizer = build_tokenizer([p["prompt"] for p in pairs[:200]], vocab_size=600)  # whole words: ~1 token each
    cfg = preset_config(args.preset)
    results = {}
    state = None
    for side in args.sides.split(","):
        cleanup()
        if side == "ours":
            model, ref = build(cfg, "ours"), build(cfg, "ours")
            state = model.state_dict()
        else:
            if state is None:
                state = build(cfg, "ours").state_dict()
            model, ref = build(cfg, "reference", state), build(cfg, "reference", state)
        ref.eval().requires_grad_(False)
        results[side] = run(side, model, ref, tokenizer, pairs, args)
        print(side, results[side], flush=True)
        del model, ref
    record = {
        "name": f"DPO throughput, {args.preset} preset, full fine-tune with a reference model",
        "card": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "command": "python bench/dpo_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "trl": __import__("trl").__version__,
            "kernels_ours": get_ops("cuda").name,
        },
        "setup": vars(args),
        **results,
    }
    if "error" not in results.get("ours", {"error": 1}) and "error" not in results.get("reference", {"error": 1}):
        record["speedup"] = round(results["ours"]["pairs_per_s"] / results["reference"]["pairs_per_s"], 2)
    print(json.dumps(record, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
