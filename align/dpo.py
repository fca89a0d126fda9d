"""Direct preference optimisation of Falcon-H1 (or any causal LM) with TRL's DPOTrainer.

    accelerate launch align/dpo.py --config recipes/falcon-h1-0.5b/dpo/lora.yaml [--beta 5 ...]

The recipe YAML sets fields of `PreferenceArguments` (preference mixture, reference cache), TRL's `DPOConfig`
and `ModelConfig`; flags override it; unknown keys are errors. What falcon-align adds over TRL
(align/preference.py): padding-free pairs with exact SSM/conv/attention isolation (`padding_free: true`), reference
log-probs cached on disk under a key of everything that changes them (`precompute_ref_log_probs: true`), the
`dpo_norm` loss name (TII's length-normalised DPO = TRL's `sigmoid_norm`), and counted drops.

Reference model: with LoRA, the starting model with its adapters disabled (no second copy); with full
fine-tuning, a second copy (`ref_model_name_or_path`, default the starting model) unless the reference
log-probs are precomputed, which needs no copy at all.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python align/dpo.py` / `accelerate launch align/dpo.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import set_seed  # noqa: E402
from trl import DPOConfig, ModelConfig  # noqa: E402

from align.args import PreferenceArguments, RecipeParser  # noqa: E402
from align.fast_path import apply, decide, fit_pair_tokens  # noqa: E402
from align.models import load_model, load_reference, load_tokenizer, peft_config  # noqa: E402
from align.preference import FalconDPOTrainer  # noqa: E402
from align.stage import finish, mixture_rows, train_and_save  # noqa: E402


def parse(argv=None):
    parser = RecipeParser((PreferenceArguments, DPOConfig, ModelConfig))
    return parser.parse_args_and_config(args=argv, fail_with_unknown_args=True)


def to_dataset(rows):
    import datasets

    keys = ("prompt", "chosen", "rejected")
    return datasets.Dataset.from_list([{k: r[k] for k in keys} for r in rows]) if rows else None


def reference_model(model_args, align_args, dpo_args, trust):
    """The frozen reference for full fine-tuning; None where none is needed: LoRA (adapters disabled), or
    precomputed log-probs without FSDP (TRL then scores with the policy before training). Under FSDP TRL would
    load a reference itself, as transformers' class: ours is loaded instead (our kernels, padding-free)."""
    fsdp = bool(dpo_args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if model_args.use_peft or (dpo_args.precompute_ref_log_probs and not fsdp):
        return None
    return load_reference(model_args, align_args, trust)


def main(argv=None, callbacks=()):
    """callbacks: TrainerCallbacks added to the stage's own."""
    align_args, dpo_args, model_args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    set_seed(dpo_args.seed)

    trust = bool(getattr(dpo_args, "trust_remote_code", False))  # off unless asked
    tokenizer = load_tokenizer(model_args, align_args, trust)
    model = load_model(model_args, align_args, trust)

    train_rows, eval_rows = mixture_rows(align_args, "preference", tokenizer, dpo_args)

    path = decide(model, align_args, dpo_args, padding_free=bool(dpo_args.padding_free), pairs=True)
    extra_callbacks = apply(path, model, dpo_args)
    trainer = FalconDPOTrainer(
        model=model,
        ref_model=reference_model(model_args, align_args, dpo_args, trust),
        args=dpo_args,
        train_dataset=to_dataset(train_rows),
        eval_dataset=to_dataset(eval_rows),
        processing_class=tokenizer,
        peft_config=peft_config(model_args),
        ref_logps_cache_dir=align_args.ref_logps_cache_dir or str(Path(dpo_args.output_dir) / "ref_logps"),
        callbacks=[*callbacks, *extra_callbacks],
    )
    fit_pair_tokens(path, trainer.train_dataset, dpo_args, model=model)  # the graphs' budgets from the tokenized pairs
    train_and_save(trainer, dpo_args, model_args, align_args, tokenizer, trust)
    return trainer


if __name__ == "__main__":
    finish(main())
