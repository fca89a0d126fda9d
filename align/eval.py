"""Evaluation: per-language exact-match accuracy on held-out verifiable tasks.

Each held-out row is a user question with one correct answer. The model gets the question through the chat
template (`add_generation_prompt`), decodes greedily until `<|im_end|>`/EOS, and scores 1 when the first
line of its reply equals the answer. Base and SFT models get the same prompt, so the metric measures whether a
model follows the chat format *and* answers correctly.

    python -m align.eval --model runs/offline/sft --heldout data/offline/heldout.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from model import FalconH1ForCausalLM


def load_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def stop_ids(tokenizer):
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


@torch.no_grad()
def generate_replies(model, tokenizer, conversations, max_new_tokens=8, batch_size=64):
    tokenizer.padding_side = "left"
    replies = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
        replies += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return replies


def exact_match_by_language(model, tokenizer, rows, **kw) -> dict:
    """rows: {messages: [user, assistant], language, answer} → {"overall": acc, "per_language": {lang: acc}}."""
    replies = generate_replies(model, tokenizer, [r["messages"][:-1] for r in rows], **kw)
    hits, totals = defaultdict(int), defaultdict(int)
    for row, reply in zip(rows, replies):
        first_line = reply.strip().split("\n")[0].strip()
        hits[row["language"]] += int(first_line == row["answer"])
        totals[row["language"]] += 1
    per_language = {lang: hits[lang] / totals[lang] for lang in sorted(totals)}
    return {
        "overall": sum(hits.values()) / max(1, sum(totals.values())),
        "per_language": per_language,
        "n": sum(totals.values()),
        "examples": [
            {"q": r["messages"][0]["content"], "reply": p, "answer": r["answer"]}
            for r, p in list(zip(rows, replies))[:6]
        ],
    }


def load_for_eval(path):
    from transformers import AutoTokenizer

    model = FalconH1ForCausalLM.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--heldout", default="data/offline/heldout.jsonl")
    parser.add_argument("--per-language", type=int, default=None, help="cap rows per language")
    args = parser.parse_args(argv)
    rows = subsample(load_jsonl(args.heldout), args.per_language)
    result = exact_match_by_language(*load_for_eval(args.model), rows)
    print(json.dumps(result, indent=2, ensure_ascii=False))


def subsample(rows, per_language):
    if per_language is None:
        return rows
    kept, seen = [], defaultdict(int)
    for r in rows:
        if seen[r["language"]] < per_language:
            kept.append(r)
            seen[r["language"]] += 1
    return kept


if __name__ == "__main__":
    main()
