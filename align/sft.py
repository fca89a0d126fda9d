"""Supervised fine-tuning of Falcon-H1 (or any causal LM) with TRL's SFTTrainer.

    accelerate launch align/sft.py --config recipes/falcon-h1-0.5b/sft/lora.yaml [--learning_rate 1e-4 ...]

The recipe YAML sets fields of `AlignArguments` (data mixture, chat template, merging), TRL's `SFTConfig` and
`ModelConfig`; flags override it; unknown keys are errors. Falcon-H1 checkpoints run on falcon-align's own
model, so packing (`packing: true`, padding-free) keeps documents apart in the SSM scan, the conv and attention.
`resume_from_checkpoint: latest` continues from the newest checkpoint in output_dir.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python align/sft.py` / `accelerate launch align/sft.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import set_seed  # noqa: E402
from trl import ModelConfig, SFTConfig  # noqa: E402

from align.args import AlignArguments, RecipeParser  # noqa: E402
from align.fast_path import apply, decide, fit_doc_slots  # noqa: E402
from align.models import load_model, load_tokenizer, peft_config  # noqa: E402
from align.sft_trainer import FalconSFTTrainer  # noqa: E402
from align.stage import finish, mixture_rows, train_and_save  # noqa: E402


def parse(argv=None):
    parser = RecipeParser((AlignArguments, SFTConfig, ModelConfig))
    return parser.parse_args_and_config(args=argv, fail_with_unknown_args=True)


def to_dataset(rows):
    import datasets

    return datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows]) if rows else None


def main(argv=None, callbacks=()):
    """callbacks: TrainerCallbacks added to the stage's own."""
    align_args, sft_args, model_args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    set_seed(sft_args.seed)

    trust = bool(getattr(sft_args, "trust_remote_code", False))  # off unless asked: checkpoints run no code
    tokenizer = load_tokenizer(model_args, align_args, trust)
    model = load_model(model_args, align_args, trust)

    train_rows, eval_rows = mixture_rows(align_args, "sft", tokenizer, sft_args)

    padding_free = sft_args.padding_free or (sft_args.packing and sft_args.packing_strategy in ("bfd", "bfd_split"))
    path = decide(model, align_args, sft_args, padding_free)
    extra_callbacks = apply(path, model, sft_args)
    trainer_cls, extra = FalconSFTTrainer, {}
    if align_args.context_parallel_size > 1:
        from align.long_context import ContextParallelSFTTrainer

        trainer_cls, extra = ContextParallelSFTTrainer, {"context_parallel_size": align_args.context_parallel_size}
    trainer = trainer_cls(
        **extra,
        model=model,
        args=sft_args,
        train_dataset=to_dataset(train_rows),
        eval_dataset=to_dataset(eval_rows),
        processing_class=tokenizer,
        peft_config=peft_config(model_args),
        callbacks=[*callbacks, *extra_callbacks],
    )
    fit_doc_slots(path, trainer.train_dataset, sft_args)  # packed rows: the graphs' document slots
    train_and_save(trainer, sft_args, model_args, align_args, tokenizer, trust)
    return trainer


if __name__ == "__main__":
    finish(main())
