"""What every training stage script does around its trainer: the mixture with its report, and the finish
(train with resume, save model, log history and tokenizer, merge LoRA)."""

from __future__ import annotations

import logging

from .data import build_mixture, write_report
from .models import merge_saved_adapter, resume_checkpoint

logger = logging.getLogger("falcon_align")


def mixture_rows(align_args, kind, count_tokens, output_dir):
    """→ (train_rows, eval_rows); writes `<kind>` mixture reports next to the run and logs what was dropped."""
    name = "mixture_report" if kind == "sft" else "preference_mixture_report"
    train_rows, eval_rows, reports = build_mixture(align_args.mixture(kind), count_tokens=count_tokens)
    report = write_report(reports, align_args.report_dir or output_dir, name=name)
    logger.info(
        "%s mixture: %d train rows, %d eval rows, %d malformed rows reported; see %s",
        kind,
        len(train_rows),
        len(eval_rows),
        sum(r.malformed for r in reports),
        report,
    )
    return train_rows, eval_rows


def finish(trainer) -> None:
    """End a script's run on every rank: all ranks meet, then trackers close and the process groups are destroyed.
    Two-process CPU runs of tests/align/test_context_parallel_sft.py (gloo), its workers ending each way:
    the process group left to the interpreter's teardown, 1 of 60 aborted after training (SIGABRT, "terminate called
    without an active exception"); destroyed without meeting first, 3 of 40 hung; meeting first, 0 of 80 failed."""
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def train_and_save(trainer, args, model_args, align_args, tokenizer, trust=False):
    trainer.train(resume_from_checkpoint=resume_checkpoint(args.resume_from_checkpoint, args.output_dir))
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json: the log history the report plots
    tokenizer.save_pretrained(args.output_dir)
    if model_args.use_peft and align_args.merge_lora:
        merge_saved_adapter(model_args, align_args, args.output_dir, tokenizer, trust)
    return trainer
