"""The embedded offline default's data: verifiable tasks in all 18 of Falcon-H1's languages.

Two tasks with exactly checkable answers — adding two numbers (0–20) and naming the number after n (0–99) —
asked in English, French, German, Spanish, Italian, Portuguese, Dutch, Polish, Swedish, Romanian, Czech, Russian,
Arabic, Hindi, Japanese, Korean, Urdu and Chinese (Simplified), each phrased as the language asks it. The same
facts, written as plain sentences, form the pretraining text of the tiny base model, so SFT teaches the chat
format and the question forms rather than the arithmetic. A fixed 15% of the questions (by a hash of language,
task and operands) is held out: never in SFT, used by the evaluation.

Digits: every number (operands, answers, the rejected near misses) is written in the international digits 0–9,
in all 18 languages. Hindi, Japanese, Korean and Chinese write arithmetic that way (half-width in the CJK
languages, as in their school arithmetic), and so do Arabic across the Maghreb and much Arabic and Urdu print and
web text, beside the Arabic-Indic digits (٠–٩, ۰–۹) of the Mashriq and of Urdu. The tiny base cannot learn the
Arabic-Indic form: its numbers then open a reply in no pretraining sentence (where a space always precedes them),
and Arabic and Urdu scored 0% exact match at every stage. Exact match (align/eval.py) compares the reply with the
answer as written here: a reply of "١٢" to the answer "12" is a miss.

    python -m align.offline.tasks --out data/offline   # regenerates the shipped files byte for byte
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from .longctx import write_offline as write_longctx

# language: (addition question, successor question, addition fact, successor fact)
TEMPLATES = {
    "en": ("What is {a} plus {b}?", "Which number comes after {n}?", "{a} plus {b} is {c}.", "After {n} comes {m}."),
    "fr": (
        "Combien font {a} plus {b} ?",
        "Quel nombre vient après {n} ?",
        "{a} plus {b} font {c}.",
        "Après {n} vient {m}.",
    ),
    "de": ("Was ist {a} plus {b}?", "Welche Zahl kommt nach {n}?", "{a} plus {b} ist {c}.", "Nach {n} kommt {m}."),
    "es": (
        "¿Cuánto es {a} más {b}?",
        "¿Qué número viene después de {n}?",
        "{a} más {b} son {c}.",
        "Después de {n} viene {m}.",
    ),
    "it": ("Quanto fa {a} più {b}?", "Quale numero viene dopo {n}?", "{a} più {b} fa {c}.", "Dopo {n} viene {m}."),
    "pt": ("Quanto é {a} mais {b}?", "Que número vem depois de {n}?", "{a} mais {b} é {c}.", "Depois de {n} vem {m}."),
    "nl": ("Wat is {a} plus {b}?", "Welk getal komt na {n}?", "{a} plus {b} is {c}.", "Na {n} komt {m}."),
    "pl": (
        "Ile to jest {a} plus {b}?",
        "Jaka liczba następuje po {n}?",
        "{a} plus {b} to {c}.",
        "Po {n} następuje {m}.",
    ),
    "sv": ("Vad är {a} plus {b}?", "Vilket tal kommer efter {n}?", "{a} plus {b} är {c}.", "Efter {n} kommer {m}."),
    "ro": ("Cât face {a} plus {b}?", "Ce număr urmează după {n}?", "{a} plus {b} fac {c}.", "După {n} urmează {m}."),
    "cs": ("Kolik je {a} plus {b}?", "Jaké číslo následuje po {n}?", "{a} plus {b} je {c}.", "Po {n} následuje {m}."),
    "ru": (
        "Сколько будет {a} плюс {b}?",
        "Какое число идёт после {n}?",
        "{a} плюс {b} будет {c}.",
        "После {n} идёт {m}.",
    ),
    "ar": (
        "كم يساوي {a} زائد {b}؟",
        "ما العدد الذي يأتي بعد {n}؟",
        "{a} زائد {b} يساوي {c}.",
        "بعد {n} يأتي {m}.",
    ),
    "hi": (
        "{a} और {b} का योग कितना है?",
        "{n} के बाद कौन-सी संख्या आती है?",
        "{a} और {b} का योग {c} है।",
        "{n} के बाद {m} आता है।",
    ),
    "ja": ("{a}足す{b}はいくつですか？", "{n}の次の数は何ですか？", "{a}足す{b}は{c}です。", "{n}の次の数は{m}です。"),
    "ko": (  # {topic}: the topic particle after {b}, 은 or 는 by how the number is read (korean_topic)
        "{a} 더하기 {b}{topic} 얼마입니까?",
        "{n} 다음에 오는 수는 무엇입니까?",
        "{a} 더하기 {b}{topic} {c}입니다.",
        "{n} 다음 수는 {m}입니다.",
    ),
    "ur": (
        "{a} اور {b} کا حاصلِ جمع کتنا ہے؟",
        "{n} کے بعد کون سا عدد آتا ہے؟",
        "{a} اور {b} کا حاصلِ جمع {c} ہے۔",
        "{n} کے بعد {m} آتا ہے۔",
    ),
    "zh": ("{a}加{b}等于多少？", "{n}的下一个数是多少？", "{a}加{b}等于{c}。", "{n}的下一个数是{m}。"),
}
LANGUAGES = list(TEMPLATES)
HELD_OUT_PERCENT = 15


def korean_topic(number: int) -> str:
    """The topic particle after a number read in Sino-Korean: 은 after a final consonant (영 0, 일 1, 삼 3, 육 6,
    칠 7, 팔 8, 십 10, 백 100), 는 after a vowel (이 2, 사 4, 오 5, 구 9)."""
    return "는" if number % 10 in (2, 4, 5, 9) else "은"


def _fields(language: str, **numbers) -> dict:
    """A template's fields: the numbers, and Korean's particle after b."""
    fields = {name: str(value) for name, value in numbers.items()}
    return {**fields, "topic": korean_topic(numbers["b"]) if "b" in numbers else ""}


def items():
    """Every (task, operands, answer) of the two tasks."""
    for a in range(21):
        for b in range(21):
            yield "add", (a, b), a + b
    for n in range(100):
        yield "next", (n,), n + 1


def is_held_out(language: str, task: str, operands) -> bool:
    digest = hashlib.sha256(f"{language}|{task}|{operands}".encode()).digest()
    return digest[0] * 100 // 256 < HELD_OUT_PERCENT


def question(language: str, task: str, operands) -> str:
    add_q, next_q, _, _ = TEMPLATES[language]
    if task == "add":
        return add_q.format(**_fields(language, a=operands[0], b=operands[1]))
    return next_q.format(**_fields(language, n=operands[0]))


def _split(split: str):
    """(language, task, operands, answer) of the 'train' or 'heldout' split, in a fixed order."""
    for language in LANGUAGES:
        for task, operands, answer in items():
            if is_held_out(language, task, operands) == (split == "heldout"):
                yield language, task, operands, str(answer)


def examples(split: str):
    """Rows {messages, language, task, answer} of the 'train' or 'heldout' split, in a fixed order."""
    for language, task, operands, answer in _split(split):
        yield {
            "messages": [
                {"role": "user", "content": question(language, task, operands)},
                {"role": "assistant", "content": answer},
            ],
            "language": language,
            "task": task,
            "answer": answer,
        }


def pretraining_documents(n_docs: int, seed: int = 0, sentences_per_doc: int = 8):
    """Plain-text documents of arithmetic and counting facts, each in one language."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        language = rng.choice(LANGUAGES)
        _, _, add_fact, next_fact = TEMPLATES[language]
        sentences = []
        for _ in range(sentences_per_doc):
            if rng.random() < 0.6:
                a, b = rng.randrange(21), rng.randrange(21)
                sentences.append(add_fact.format(**_fields(language, a=a, b=b, c=a + b)))
            else:
                n = rng.randrange(100)
                sentences.append(next_fact.format(**_fields(language, n=n, m=n + 1)))
        docs.append(" ".join(sentences))
    return docs


def wrong_answer(language: str, task: str, operands) -> str:
    """A near miss for the rejected side of a preference pair: off by one or two (never the right answer, never
    negative), fixed per question so the shipped files regenerate byte for byte."""
    digest = hashlib.sha256(f"wrong|{language}|{task}|{operands}".encode()).digest()
    right = operands[0] + operands[1] if task == "add" else operands[0] + 1
    offsets = (-2, -1, 1, 2) if task == "add" else (-2, -1, 1)  # after 7: "6", "7" or "9"
    wrong = right + offsets[digest[0] % len(offsets)]
    return str(wrong if wrong >= 0 else right + 1)


def preference_pairs(split: str):
    """Rows {prompt, chosen, rejected, language, task} over the same questions (and held-out split) as SFT."""
    for language, task, operands, answer in _split(split):
        yield {
            "prompt": question(language, task, operands),
            "chosen": answer,
            "rejected": wrong_answer(language, task, operands),
            "language": language,
            "task": task,
        }


def write_shipped(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    train = list(examples("train"))
    # two sources: the arithmetic questions and the counting questions, so the recipe shows per-source weights
    for task, name in (("add", "sft_addition.jsonl"), ("next", "sft_counting.jsonl")):
        rows = [r for r in train if r["task"] == task]
        if task == "next":  # three deliberately malformed rows: the mixture report must count and show them
            rows += [
                {
                    "messages": [
                        {"role": "user", "content": "Which number comes after 7?"},
                        {"role": "assistant", "content": ""},
                    ],
                    "language": "en",
                },
                {"messages": [{"role": "user", "content": "Quel nombre vient après 3 ?"}], "language": "fr"},
                {"messages": "not a list", "language": "de"},
            ]
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    pairs = list(preference_pairs("train"))
    pairs += [  # malformed on purpose: identical sides, an empty completion, a missing field
        {"prompt": "What is 1 plus 1?", "chosen": "2", "rejected": "2", "language": "en"},
        {"prompt": "Was ist 2 plus 2?", "chosen": "4", "rejected": "", "language": "de"},
        {"prompt": "Combien font 3 plus 3 ?", "chosen": "6", "language": "fr"},
    ]
    _write_jsonl(out / "dpo_pairs.jsonl", pairs)
    _write_jsonl(out / "heldout_pairs.jsonl", list(preference_pairs("heldout")))
    write_longctx(out)  # the tiny long-context recipe's passkey rows
    heldout = list(examples("heldout"))
    (out / "heldout.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in heldout), encoding="utf-8"
    )


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/offline")
    write_shipped(Path(parser.parse_args().out))
