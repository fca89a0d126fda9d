"""What every training stage script does around its trainer: the mixture with its report, and the finish
(train with resume, save model, log history and tokenizer, merge LoRA)."""

from __future__ import annotations

import logging

from .data import build_mixture, prompt_turns, write_report
from .models import chat_ids, merge_saved_adapter, resume_checkpoint
from .validate import InputError

logger = logging.getLogger("falcon_align")


def mixture_rows(align_args, kind, tokenizer, args, name=None):
    """→ (train_rows, eval_rows); writes `<kind>` mixture reports (or `name`) next to the run (args.output_dir, or
    report_dir) and logs what was dropped. Rows are measured through the chat template, as the trainer will
    tokenize them."""
    name = name or ("mixture_report" if kind == "sft" else "preference_mixture_report")
    if not align_args.sources:
        raise InputError("no data sources given", "sources")
    mixture = align_args.mixture(kind, max_length=cut_length(args, kind))
    train_rows, eval_rows, reports = build_mixture(mixture, measure=TokenLengths(tokenizer))
    report = write_report(reports, align_args.report_dir or args.output_dir, name=name)
    logger.info(
        "%s mixture: %d train rows, %d eval rows, %d malformed rows reported; see %s",
        kind,
        len(train_rows),
        len(eval_rows),
        sum(r.malformed for r in reports),
        report,
    )
    for r in reports:
        if r.too_long:
            logger.warning(
                "%s: %d of %d rows dropped: their answer starts past max_length=%s, so they would train nothing "
                "(raise max_length to keep them); %d more are cut but keep part of their answer. See %s",
                r.source,
                r.too_long,
                r.raw_rows,
                mixture.max_length,
                r.truncated,
                report,
            )
    return train_rows, eval_rows


def cut_length(args, kind) -> int | None:
    """Where the trainer cuts a row keeping its start (TRL 1.16), or None when no row loses its answer: DPO and
    unpacked SFT with truncation_mode keep_start; packed SFT with the bfd strategy (bfd_split and wrapped move
    the overflow into other rows)."""
    if kind == "sft" and getattr(args, "packing", False):
        return args.max_length if args.packing_strategy == "bfd" else None
    return args.max_length if getattr(args, "truncation_mode", None) == "keep_start" else None  # GRPO: no cut


class TokenLengths:
    """A row's lengths in the tokens its trainer sees (the chat template); align.data.CharLengths's interface."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, payload) -> tuple[int, int]:
        if "messages" in payload:
            n = len(chat_ids(self.tokenizer, payload["messages"]))
            return n, n
        lengths = [len(chat_ids(self.tokenizer, payload["prompt"] + payload[k])) for k in ("chosen", "rejected")]
        return sum(lengths), max(lengths)

    def answer_at(self, payload) -> int:
        turns = prompt_turns(payload)
        return len(chat_ids(self.tokenizer, turns, add_generation_prompt=True)) if turns else 0


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
