"""Reinforcement learning with verifiable rewards: GRPO of Falcon-H1 (or any causal LM) with TRL's GRPOTrainer.

    accelerate launch align/grpo.py --config recipes/falcon-h1-0.5b/grpo/lora.yaml [--beta 0.01 ...]

The recipe YAML sets fields of `GRPOArguments` (prompt mixture, rewards by name), TRL's `GRPOConfig` and
`ModelConfig`; flags override it; unknown keys are errors. Each row of the mixture is a conversation whose last
assistant turn holds the reference answer (GSM8K's "#### 72" and MATH's `\\boxed{}` are read as the answer): the
prompt is the turns before it, and the `answer` and `language` columns reach the rewards (align/rewards.py).
What falcon-align adds over TRL (align/grpo_trainer.py): generation by the model's own `generate`, the log-prob
agreement of the decode step and the training forward logged every step, padding-free training rows, and
falcon-align's model as the KL reference.

Reference for KL (beta > 0): with LoRA, the starting model with its adapters disabled (no second copy); with full
fine-tuning, a second copy (`ref_model_name_or_path`, default the starting model).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python align/grpo.py` / `accelerate launch align/grpo.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import set_seed  # noqa: E402
from trl import GRPOConfig, ModelConfig  # noqa: E402

from align.args import GRPOArguments, RecipeParser  # noqa: E402
from align.fast_path import apply, decide  # noqa: E402
from align.grpo_trainer import FalconGRPOTrainer, check_loss_type  # noqa: E402
from align.models import load_model, load_reference, load_tokenizer, peft_config  # noqa: E402
from align.rewards import reference_answer, resolve  # noqa: E402
from align.stage import finish, mixture_rows, train_and_save  # noqa: E402


def parse(argv=None):
    parser = RecipeParser((GRPOArguments, GRPOConfig, ModelConfig))
    parsed = parser.parse_args_and_config(args=argv, fail_with_unknown_args=True)
    check_loss_type(parsed[1].loss_type)
    return parsed


def to_dataset(rows):
    """Mixture rows → {prompt: the turns before the last answer, answer, language}."""
    import datasets

    if not rows:
        return None
    return datasets.Dataset.from_list(
        [
            {
                "prompt": r["messages"][:-1],
                "answer": reference_answer(r["messages"][-1]["content"]),
                "language": r["language"],
            }
            for r in rows
        ]
    )


def reference_model(model_args, align_args, grpo_args, trust):
    """The frozen KL reference for full fine-tuning with beta > 0; None where none is needed (beta 0, or LoRA)."""
    if grpo_args.beta == 0.0 or model_args.use_peft:
        return None
    return load_reference(model_args, align_args, trust)


def main(argv=None, callbacks=()):
    """callbacks: TrainerCallbacks added to the stage's own."""
    align_args, grpo_args, model_args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    set_seed(grpo_args.seed)

    trust = bool(getattr(grpo_args, "trust_remote_code", False))  # off unless asked
    tokenizer = load_tokenizer(model_args, align_args, trust)
    tokenizer.padding_side = "left"  # TRL's GRPOTrainer wants prompts padded on the left
    model = load_model(model_args, align_args, trust)

    train_rows, eval_rows = mixture_rows(align_args, "sft", tokenizer, grpo_args, name="grpo_mixture_report")
    rewards = resolve(align_args.reward_funcs, grpo_args.max_completion_length, align_args.overlong_buffer)

    path = decide(model, align_args, grpo_args, padding_free=False)  # rows vary per step: no captured training graphs
    extra_callbacks = apply(path, model, grpo_args)
    trainer = FalconGRPOTrainer(
        model=model,
        reward_funcs=rewards,
        ref_model=reference_model(model_args, align_args, grpo_args, trust),
        args=grpo_args,
        train_dataset=to_dataset(train_rows),
        eval_dataset=to_dataset(eval_rows),
        processing_class=tokenizer,
        peft_config=peft_config(model_args),
        callbacks=[*callbacks, *extra_callbacks],
    )
    train_and_save(trainer, grpo_args, model_args, align_args, tokenizer, trust)
    return trainer


if __name__ == "__main__":
    finish(main())
