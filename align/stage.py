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
    Why in this order: a process group left to the interpreter's teardown can abort a finished run (gloo's threads
    die with "terminate called without an active exception"), and a rank that destroys its group while another
    still runs a collective leaves that one waiting forever; meeting first lets every rank finish its last
    collective before any group goes away."""
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
