"""The offline default's tiny base model, made by the project: a BPE tokenizer with Falcon-H1's special tokens
and chat template, and a small Falcon-H1 pretrained on packed documents of multilingual arithmetic facts.

    python -m align.offline.base --out runs/offline/base [--steps 250]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from model import FalconH1Config, FalconH1ForCausalLM
from model.presets import _MUP_0_5B

from ..templates import falcon_h1_chat_template
from .tasks import examples, pretraining_documents

SPECIAL = ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(texts, vocab_size=768):
    """Byte-level BPE trained on the project's own text; ids 0–4 are the special tokens (pad 0, bos 1). Bytes
    cover every script: no text is out of vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = as_chat_tokenizer(tok)
    fast.padding_side = "left"
    return fast


def as_chat_tokenizer(tok):
    """A trained `tokenizers.Tokenizer` → transformers' PreTrainedTokenizerFast with the offline special tokens
    (Falcon-H1's names) and the chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = falcon_h1_chat_template()
    return fast


def offline_tokenizer(docs):
    """The base model's tokenizer: BPE over its pretraining documents and every training question and answer.
    1024 asks for more merges than that text has (932 tokens result), so every number 0–100 is one token, with
    and without a leading space (768 split 14% of the held-out answers in two)."""
    texts = docs + [m["content"] for row in examples("train") for m in row["messages"]]
    return build_tokenizer(texts, vocab_size=1024)


def tiny_config(tokenizer) -> FalconH1Config:
    return FalconH1Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        mamba_d_ssm=256,
        mamba_n_heads=8,
        mamba_d_state=16,
        mamba_n_groups=1,
        mamba_chunk_size=64,
        mamba_rms_norm=True,
        mamba_norm_before_gate=False,
        rope_theta=1e11,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **_MUP_0_5B,
    )


def packed_batches(token_docs, batch: int, width: int, rng: random.Random):
    """Endless (ids, position_ids) batches: documents back to back, positions restarting per document."""
    while True:
        ids, pos = [], []
        for _ in range(batch):
            row_ids, row_pos = [], []
            while len(row_ids) < width:
                doc = token_docs[rng.randrange(len(token_docs))]
                row_ids += doc
                row_pos += list(range(len(doc)))
            ids.append(row_ids[:width])
            pos.append(row_pos[:width])
        yield torch.tensor(ids), torch.tensor(pos)


def pretrain(model, token_docs, steps: int, batch=12, width=192, lr=1e-2, seed=0, log_every=50):
    """AdamW (β 0.9/0.95, no weight decay) with linear warm-up; packed rows, documents isolated."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * max(0.1, 1 - s / steps))
    batches = packed_batches(token_docs, batch, width, random.Random(seed))
    model.train()
    losses = []
    for step in range(steps):
        ids, pos = next(batches)
        loss = model(ids, position_ids=pos, labels=ids.masked_fill(pos == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            print(f"  pretrain step {step:4d}  loss {loss.item():.3f}", flush=True)
    model.eval()
    return losses


def make_base(out: str | Path, steps: int = 250, seed: int = 0, n_docs: int = 4000) -> Path:
    out = Path(out)
    torch.manual_seed(seed)
    docs = pretraining_documents(n_docs, seed=seed)
    tokenizer = offline_tokenizer(docs)
    token_docs = [[tokenizer.bos_token_id] + tokenizer(d)["input_ids"] + [tokenizer.eos_token_id] for d in docs]
    model = FalconH1ForCausalLM(tiny_config(tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[base] tiny Falcon-H1 {n_params / 1e6:.2f}M params, vocab {len(tokenizer)}, {len(docs)} documents")
    t0 = time.perf_counter()
    losses = pretrain(model, token_docs, steps, seed=seed)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "base_report.json").write_text(
        json.dumps(
            {
                "params": n_params,
                "steps": steps,
                "first_loss": losses[0],
                "last_loss": losses[-1],
                "seconds": round(time.perf_counter() - t0, 1),
                "losses": [round(x, 4) for x in losses],
            },
            indent=2,
        )
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/offline/base")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_base(args.out, args.steps, args.seed)
