"""A GRPO step, split into generation and training: FalconGRPOTrainer against TRL's GRPOTrainer over transformers'
FalconH1ForCausalLM, same run, same weights, same settings; and each side's bf16 log-prob agreement.

    python -m bench grpo --preset 0.5b --prompts 8 --generations 8 --completion 256 --steps 6 --warmup 2 --out <json>

Both sides train full fine-tuning in bf16 with TRL's GRPO (loss dapo, beta 0: no reference forward) on the same
synthetic prompts, every completion forced to `--completion` new tokens (`min_new_tokens`), so both generate and
train the same token counts. Ours: generation by falcon-align's `generate` (static cache, CUDA-graph decode step),
padding-free training rows on our model and kernels. Reference: TRL's own generation (transformers' `generate`) and
padded training forward on transformers' model. Reported per side: the rollout's seconds and completion tokens/s
(generation), the rest of the step's seconds and tokens/s over prompt + completion (training), and the agreement of
the sampled tokens' log-probs between that side's `generate` (its raw logits, fp32, at the sampling temperature,
recorded step by step: align.grpo_trainer.generate_with_logps)
and that side's training forward (TRL's fused LM head) before any update: mean and max |Δ| and the spread of the
importance ratio exp(train − sampled). Random weights are fine: the shapes are real.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from align.grpo_trainer import completion_lengths, generate_with_logps, left_pad, logprob_agreement
from align.offline.base import build_tokenizer
from bench import common
from model import preset_config
from model.kernels import get_ops

WORDS = "the a model token layer state scan attention memory fast slow river cloud seven green answer data".split()


def synthetic_prompts(n, words, seed=0):
    rng = random.Random(seed)
    return [[{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(words))}] for _ in range(n)]


def parity_reward(completion_ids, **kwargs):
    """Any reward serves a timing: completion length parity varies within groups (non-zero advantages)."""
    return [float(sum(ids) % 2) for ids in completion_ids]


def timed(cls):
    """`cls` (a GRPOTrainer) timing each rollout (generation, scoring) and each optimizer step, synchronised."""

    class Timed(cls):
        def _generate_and_score_completions(self, inputs):
            common.sync()
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            common.sync()
            mask = out["completion_mask"]
            self.rollouts.append((time.perf_counter() - t, int(mask.sum()), int(out["prompt_mask"].sum())))
            return out

        def training_step(self, *args, **kwargs):
            common.sync()
            t = time.perf_counter()
            out = super().training_step(*args, **kwargs)
            common.sync()
            self.steps.append(time.perf_counter() - t)
            return out

    Timed.__name__ = cls.__name__
    return Timed


def grpo_config(args, side):
    from trl import GRPOConfig

    cuda = args.device == "cuda"
    return GRPOConfig(
        output_dir=f"/tmp/grpo_bench_{side}",
        use_cpu=not cuda,
        bf16=args.dtype == "bfloat16",
        per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations,
        max_completion_length=args.completion,
        generation_kwargs={"min_new_tokens": args.completion},
        temperature=1.0,
        loss_type="dapo",
        beta=0.0,
        learning_rate=1e-6,
        max_steps=args.warmup + args.steps,
        gradient_checkpointing=False,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )


@torch.no_grad()
def agreement(trainer, prompts, args) -> dict:
    """Sampled tokens' log-probs from the side's own `generate` against its training forward (TRL's fused LM head,
    as in its loss), same weights, before any update."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    tok = trainer.processing_class
    rows = [list(trainer._tokenize_prompts([p])[0][0]) for p in prompts]
    ids, mask = left_pad(rows, tok.pad_token_id, model.device)
    torch.manual_seed(1)
    completion, sampled = generate_with_logps(
        model, ids, mask, 1.0, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=args.completion,
        min_new_tokens=args.completion, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    n = completion_lengths(completion, trainer.eos_token_ids)
    keep = torch.arange(completion.size(1), device=completion.device)[None] < n[:, None]
    full_mask = torch.cat([mask, keep.long()], 1)
    trained, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, torch.cat([ids, completion], 1), full_mask, completion.size(1), batch_size=len(rows)
    )
    stats = logprob_agreement(trained, sampled.to(trained.device), keep)
    return {k: float(f"{v:.3g}") for k, v in stats.items()}


def run(side, model, tokenizer, prompts, args) -> dict:
    from datasets import Dataset
    from trl import GRPOTrainer

    from align.grpo_trainer import FalconGRPOTrainer

    cls = timed(FalconGRPOTrainer if side == "ours" else GRPOTrainer)
    trainer = cls(
        model=model,
        reward_funcs=[parity_reward],
        args=grpo_config(args, side),
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tokenizer,
    )
    trainer.rollouts, trainer.steps = [], []
    result = {"logprob_agreement": agreement(trainer, prompts[: args.prompts], args)}
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.train()
    except torch.OutOfMemoryError:
        return {**result, "error": "out of memory"}
    rollouts, steps = trainer.rollouts[args.warmup :], trainer.steps[args.warmup :]
    gen_s = statistics.median(r[0] for r in rollouts)
    train_s = statistics.median(s - r[0] for s, r in zip(steps, rollouts))
    completion_tokens = statistics.median(r[1] for r in rollouts)
    all_tokens = statistics.median(r[1] + r[2] for r in rollouts)
    result.update(
        generation_s=round(gen_s, 4),
        generation_tokens_per_s=round(completion_tokens / gen_s),
        training_s=round(train_s, 4),
        training_tokens_per_s=round(all_tokens / train_s),
        step_s=round(gen_s + train_s, 4),
        completion_tokens=completion_tokens,
        tokens=all_tokens,
        peak_gib=common.peak_gib() if args.device == "cuda" else None,
    )
    if side == "ours":
        history = trainer.logprob_history[args.warmup :] or trainer.logprob_history
        result["logged_abs_diff_max"] = max(h["abs_diff_max"] for h in history)  # the trainer's own per-step check
    return result


def models(cfg, side, state, args):
    dtype = getattr(torch, args.dtype)
    if side == "ours":
        model = common.build(cfg, "ours", device=args.device, dtype=dtype)
        return model, model.state_dict()
    state = state if state is not None else common.build(cfg, "ours", device="cpu").state_dict()
    return common.build(cfg, "reference", state, device=args.device, dtype=dtype), state


def parser() -> argparse.ArgumentParser:
    ap = common.new_parser("grpo", __doc__, "0.5b")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count (smoke runs)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt")
    ap.add_argument("--prompt-words", type=int, default=128, help="words per prompt (~1 token each)")
    ap.add_argument("--completion", type=int, default=256, help="new tokens per completion")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sides", default="ours,reference")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    return ap


def main(argv: list[str]) -> dict:
    args = common.parse(parser(), argv)
    prompts = synthetic_prompts(args.prompts * (args.warmup + args.steps), args.prompt_words)
    tokenizer = build_tokenizer([p[0]["content"] for p in prompts[:200]], vocab_size=600)
    tokenizer.padding_side = "left"
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    cfg = preset_config(args.preset, **overrides)
    name = f"GRPO step, {args.preset} preset, full fine-tune: generation and training, ours against TRL + transformers"
    record = common.envelope(name, "grpo", argv, args)
    record.update(kernels=get_ops(args.device).name, setup={k: v for k, v in vars(args).items() if k != "commit"})
    sides, state = {}, None
    for side in args.sides.split(","):
        common.cleanup()
        model, state = models(cfg, side, state, args)
        sides[side] = record[side] = run(side, model, tokenizer, prompts, args)
        print(side, json.dumps(sides[side]), flush=True)
        common.write_result(args.out, record)  # each side as it finishes: a run stopped at its limit keeps ours
        del model
    ours, ref = sides.get("ours", {}), sides.get("reference", {})
    for key in ("generation_tokens_per_s", "training_tokens_per_s"):
        if key in ours and key in ref:
            record[f"speedup_{key.split('_')[0]}"] = round(ours[key] / ref[key], 2)
    common.write_result(args.out, record)
    rows = []
    for side, r in sides.items():
        agree = r.get("logprob_agreement", {})
        speeds = [r.get("generation_tokens_per_s", r.get("error")), r.get("training_tokens_per_s"), r.get("step_s")]
        rows.append([side, *speeds, agree.get("abs_diff_mean"), agree.get("abs_diff_max"), r.get("peak_gib")])
    title = (
        f"GRPO, {args.preset}, {record['card']}: generation ×{common.cell(record.get('speedup_generation'))}, "
        f"training ×{common.cell(record.get('speedup_training'))}"
    )
    header = ["side", "gen tok/s", "train tok/s", "step s", "|Δ logp| mean", "|Δ logp| max", "peak GiB"]
    common.print_table(title, header, rows)
    return record
