"""Evaluation: per-language exact match on held-out verifiable tasks, and preference accuracy on held-out pairs.

Exact match: each held-out row is a user question with one correct answer. The model gets the question through
the chat template (`add_generation_prompt`), decodes greedily until `<|im_end|>`/EOS, and scores 1 when the first
line of its reply equals the answer. Base, SFT and DPO models get the same prompt, so the metric measures whether
a model follows the chat format *and* answers correctly.

Preference accuracy: on held-out (prompt, chosen, rejected) pairs, the share where the model gives the chosen
completion the higher mean log-prob per token (the length-normalised score dpo_norm optimises; ties count
half). Against a reference model it also gives DPO's implicit rewards β·(log π − log π_ref) per token: their
accuracy and mean margin.

    python -m align.eval --model runs/offline/dpo --heldout data/offline/heldout.jsonl \
        --pairs data/offline/heldout_pairs.jsonl --reference runs/offline/sft
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from model import FalconH1ForCausalLM

from .models import chat_ids


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
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
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
    hits = torch.tensor([float(reply.strip().split("\n")[0].strip() == r["answer"]) for r, reply in zip(rows, replies)])
    return {
        **_by_language(rows, hits, "overall"),
        "n": len(rows),
        "examples": [
            {"q": r["messages"][0]["content"], "reply": p, "answer": r["answer"]}
            for r, p in list(zip(rows, replies))[:6]
        ],
    }


def _pair_tokens(tokenizer, pair):
    """→ (prompt ids, [chosen completion ids, rejected completion ids]) as TRL's DPOTrainer tokenizes them."""
    prompt = chat_ids(tokenizer, pair["prompt"], add_generation_prompt=True)
    completions = []
    for side in ("chosen", "rejected"):
        full = chat_ids(tokenizer, pair["prompt"] + pair[side])
        if full[: len(prompt)] != prompt:
            raise ValueError(f"the chat template does not render the prompt as a prefix of the {side} conversation")
        completions.append(full[len(prompt) :])
    return prompt, completions


@torch.no_grad()
def completion_logps(model, tokenizer, pairs, batch_size=8) -> torch.Tensor:
    """(n, 2, 2): for each pair, [chosen, rejected] × [summed completion log-prob, completion length]."""
    rows, spans = [], []
    for pair in pairs:
        prompt, completions = _pair_tokens(tokenizer, pair)
        for completion in completions:
            rows.append(prompt + completion)
            spans.append((len(prompt), len(completion)))
    out = torch.zeros(len(rows), 2)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(chunk):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model(ids, attention_mask=mask, use_cache=False).logits[:, :-1]  # (b, width-1, V), scaled
        picked = logits.gather(-1, ids[:, 1:, None])[..., 0].float()
        token_logps = (picked - logits.float().logsumexp(-1)).cpu()  # (b, width-1): log p(token t+1)
        for i in range(len(chunk)):
            p, c = spans[start + i]
            out[start + i] = torch.tensor([token_logps[i, p - 1 : p - 1 + c].sum(), c])
    return out.view(len(pairs), 2, 2)


def preference_metrics(model, tokenizer, pairs, reference=None, beta=5.0) -> dict:
    """Held-out preference accuracy per language (mean log-prob per completion token, chosen > rejected), and
    with a reference model the implicit-reward accuracy and mean margin, β·(mean log π − mean log π_ref)."""
    scores = completion_logps(model, tokenizer, pairs)
    mean = scores[..., 0] / scores[..., 1]  # (n, 2) mean log-prob per token
    wins = (mean[:, 0] > mean[:, 1]).float() + 0.5 * (mean[:, 0] == mean[:, 1]).float()
    result = {"n": len(pairs), **_by_language(pairs, wins, "accuracy")}
    if reference is not None:
        ref = completion_logps(reference, tokenizer, pairs)
        rewards = beta * (mean - ref[..., 0] / ref[..., 1])  # (n, 2)
        margins = rewards[:, 0] - rewards[:, 1]
        result["reward_accuracy"] = float((margins > 0).float().mean())
        result["reward_margin"] = float(margins.mean())
        result["rewards_chosen"] = float(rewards[:, 0].mean())
        result["rewards_rejected"] = float(rewards[:, 1].mean())
    return result


def _by_language(rows, values, name):
    groups = defaultdict(list)
    for row, v in zip(rows, values.tolist()):
        groups[row.get("language", "unknown")].append(v)
    return {
        name: float(values.mean()) if len(values) else 0.0,
        "per_language": {lang: sum(v) / len(v) for lang, v in sorted(groups.items())},
    }


def passkey_accuracy(
    model, tokenizer, lengths, depths=(0.0, 0.25, 0.5, 0.75, 1.0), per_cell=4, count_tokens=None, digits=5, spaced=False
):
    """Passkey retrieval (align/offline/longctx.py) by exact match over lengths × depths →
    {"overall": acc, "grid": {length: {depth: acc}}}. Lengths are in the tokenizer's tokens unless count_tokens
    says otherwise; the rows (seeds from 1000) are not among the training files' (seeds below 1000)."""
    from .offline.longctx import passkey_example

    if count_tokens is None:
        count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    grid, hits, total = {}, 0, 0
    for n in lengths:
        rows = [passkey_example(n, d, count_tokens, 1000 + i, digits, spaced) for d in depths for i in range(per_cell)]
        replies = generate_replies(model, tokenizer, [r["messages"][:-1] for r in rows], batch_size=8)
        scores = [int(reply.strip().split("\n")[0].strip() == r["answer"]) for r, reply in zip(rows, replies)]
        grid[n] = {d: sum(scores[j * per_cell : (j + 1) * per_cell]) / per_cell for j, d in enumerate(depths)}
        hits, total = hits + sum(scores), total + len(scores)
    return {"overall": hits / max(1, total), "grid": grid}


def pairs_from_rows(rows):
    """Shipped pair rows (prompt/chosen/rejected as text) → message lists, language kept."""
    return [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
            "language": r.get("language", "unknown"),
        }
        for r in rows
    ]


def load_for_eval(path):
    from transformers import AutoTokenizer

    model = FalconH1ForCausalLM.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--heldout", default="data/offline/heldout.jsonl")
    parser.add_argument("--per-language", type=int, default=None, help="cap rows per language")
    parser.add_argument("--pairs", default=None, help="held-out preference pairs (jsonl: prompt/chosen/rejected)")
    parser.add_argument("--reference", default=None, help="reference model for implicit rewards")
    parser.add_argument("--beta", type=float, default=5.0)
    args = parser.parse_args(argv)
    model, tokenizer = load_for_eval(args.model)
    rows = subsample(load_jsonl(args.heldout), args.per_language)
    result = {"exact_match": exact_match_by_language(model, tokenizer, rows)}
    if args.pairs:
        pairs = pairs_from_rows(subsample(load_jsonl(args.pairs), args.per_language))
        reference = load_for_eval(args.reference)[0] if args.reference else None
        result["preference"] = preference_metrics(model, tokenizer, pairs, reference, args.beta)
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
