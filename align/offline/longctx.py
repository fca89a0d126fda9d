"""Synthetic long-context tasks, made offline at any length: passkey retrieval and multi-document lookup.

Passkey: a five-digit key (or `digits`) hidden at a chosen depth (0 = start, 1 = end) of filler
text; the question asks for it. Lookup: numbered documents, each with its own code; the question names one
document. Both are verifiable by exact match and scale to any length, so the same generator serves the tiny CPU
recipe (a few hundred tokens) and real 256K runs.

    python -m align.offline.longctx --out data/longctx --tokenizer tiiuae/Falcon-H1-7B-Instruct \\
        --lengths 16384,65536,262144 --per-length 200       # training/eval files for the long recipes
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FILLER = (  # whole sentences, drawn one by one: rows rarely repeat, and a depth falls between any two of them
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
    "Rivers run to the sea. ",
    "Birds fly south in winter. ",
    "The road goes ever on. ",
)


def _filler_to(n_tokens: int, count_tokens, rng: random.Random) -> list[str]:
    """Filler sentences whose total token count reaches about n_tokens (each sentence measured once)."""
    sizes = [max(1, count_tokens(s)) for s in FILLER]
    pieces, total = [], 0
    while total < n_tokens:
        i = rng.randrange(len(FILLER))
        pieces.append(FILLER[i])
        total += sizes[i]
    return pieces


def _number(rng: random.Random, digits: int) -> str:
    if digits < 1:
        raise ValueError(f"digits must be at least 1, got {digits}")
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def passkey_example(
    n_tokens: int, depth: float, count_tokens, seed: int = 0, digits: int = 5, spaced: bool = False
) -> dict:
    """{messages: [user, assistant], answer, length, depth}: a `digits`-digit key sits at `depth` of ~n_tokens of
    filler. The key is quoted in the text, so a byte-level tokenizer gives its digits the same tokens there as in
    the answer (which follows a newline); `spaced` writes it digit by digit ("4 2"), in the text and the answer."""
    rng = random.Random(f"passkey|{n_tokens}|{depth}|{seed}")
    key = _number(rng, digits)
    key = " ".join(key) if spaced else key
    pieces = _filler_to(n_tokens, count_tokens, rng)
    pieces.insert(round(depth * len(pieces)), f'The pass key is "{key}". Remember it. "{key}" is the pass key. ')
    question = "".join(pieces) + "\nWhat is the pass key?"
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": key}],
        "answer": key,
        "task": "passkey",
        "length": n_tokens,
        "depth": depth,
    }


def lookup_example(n_tokens: int, n_docs: int, count_tokens, seed: int = 0, digits: int = 3) -> dict:
    """Numbered documents of filler, each stating its `digits`-digit code; the question asks for one document's."""
    rng = random.Random(f"lookup|{n_tokens}|{n_docs}|{seed}")
    codes = [_number(rng, digits) for _ in range(n_docs)]
    docs = []
    for i, code in enumerate(codes):
        body = "".join(_filler_to(n_tokens // n_docs, count_tokens, rng))
        docs.append(f"Document {i + 1}. The code of document {i + 1} is {code}. {body}")
    target = rng.randrange(n_docs)
    question = "\n".join(docs) + f"\nWhat is the code of document {target + 1}?"
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": codes[target]}],
        "answer": codes[target],
        "task": "lookup",
        "length": n_tokens,
        "depth": target / max(1, n_docs - 1),
    }


def examples(
    lengths,
    count_tokens,
    per_length: int,
    depths=(0.0, 0.25, 0.5, 0.75, 1.0),
    seed: int = 0,
    digits=(5, 3),
    lookup_every: int = 4,
    spaced: bool = False,
):
    """Passkey rows over lengths × depths, plus one lookup row per `lookup_every` passkeys (0: none),
    deterministic. digits: (passkey digits, lookup code digits); spaced: passkeys digit by digit."""
    rows = []
    for n in lengths:
        for i in range(per_length):
            depth = depths[i % len(depths)]
            rows.append(passkey_example(n, depth, count_tokens, seed * 100_000 + i, digits[0], spaced))
            if lookup_every and i % lookup_every == lookup_every - 1:
                rows.append(lookup_example(n, 4, count_tokens, seed=seed * 100_000 + i, digits=digits[1]))
    return rows


OFFLINE_LENGTHS = (16, 32, 48)  # ~150-250 tokens with the chat template and a small byte-level BPE
OFFLINE_PER_LENGTH = 200
OFFLINE_KEYS = dict(digits=(2, 3), lookup_every=0, spaced=True)  # a spaced two-digit key: 90 keys, chance 1/90


def offline_count(text: str) -> int:
    """The tiny recipe's length unit: ~3 characters per token, no tokenizer needed."""
    return len(text) // 3


def write_offline(out: Path) -> Path:
    """The tiny recipe's file (data/offline/longctx_train.jsonl): passkeys only, of two spaced digits, at lengths
    OFFLINE_LENGTHS in offline_count's units (a from-scratch model on CPU learns to retrieve these in minutes)."""
    rows = examples(OFFLINE_LENGTHS, offline_count, per_length=OFFLINE_PER_LENGTH, **OFFLINE_KEYS)
    path = Path(out) / "longctx_train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/longctx")
    parser.add_argument("--tokenizer", required=True, help="a tokenizer id or path: lengths are in its tokens")
    parser.add_argument("--lengths", default="16384,65536,262144")
    parser.add_argument("--per-length", type=int, default=200)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    for split, seed in (("train", 0), ("eval", 1)):
        rows = examples(lengths, count, args.per_length if split == "train" else 20, seed=seed)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{out / f'{split}.jsonl'}: {len(rows)} rows")


if __name__ == "__main__":
    main()
