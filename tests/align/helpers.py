"""Shared pieces of the alignment tests: CPU trainer flags and a tiny base checkpoint with the project's tokenizer."""

import torch

from align.offline.base import build_tokenizer
from align.offline.tasks import examples, pretraining_documents
from model import FalconH1ForCausalLM
from model.presets import _MUP_0_5B
from tests.conftest import tiny_config_for

CPU_TRAINING = [  # deterministic CPU runs, logged every step, nothing saved mid-run
    "--use_cpu",
    "True",
    "--bf16",
    "False",
    "--gradient_checkpointing",
    "False",
    "--report_to",
    "none",
    "--logging_steps",
    "1",
    "--seed",
    "0",
    "--lr_scheduler_type",
    "constant",
    "--save_strategy",
    "no",
    "--disable_tqdm",
    "True",
]


def make_tiny_base(path, lm_head_multiplier=1.0, mup=True, **shape):
    """A 2-layer Falcon-H1 with 0.5B-style µP multipliers (mup=False: all 1) and a 400-token BPE tokenizer, saved at
    `path`; `shape` overrides tiny_config_for's sizes."""
    tok = build_tokenizer(
        pretraining_documents(200) + [m["content"] for r in examples("train") for m in r["messages"]], vocab_size=400
    )
    multipliers = {**_MUP_0_5B, "lm_head_multiplier": lm_head_multiplier} if mup else {}
    cfg = tiny_config_for(tok, mamba_rms_norm=True, **multipliers, **shape)
    torch.manual_seed(0)
    FalconH1ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
