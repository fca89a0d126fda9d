"""The offline default's data in Falcon-H1's 18 languages: shipped files, digits, held-out rows, tokenizer, metric."""

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

import torch

from align import eval as evaluation
from align.offline import tasks
from align.offline.tasks import LANGUAGES, korean_topic, pretraining_documents

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "offline"
FALCON_H1 = {"en", "fr", "de", "es", "it", "pt", "nl", "pl", "sv", "ro", "cs", "ru", "ar", "hi", "ja", "ko", "ur", "zh"}


def _jsonl(name):
    return [json.loads(line) for line in (SHIPPED / name).read_text(encoding="utf-8").splitlines()]


def _numbers(text):
    """The numbers in `text`, read in whatever decimal digits they are written (Arabic-Indic ones included)."""
    return [int("".join(str(unicodedata.digit(c)) for c in m)) for m in re.findall(r"\d+", text)]


def test_all_18_languages_ship_train_and_held_out_rows():
    assert set(LANGUAGES) == FALCON_H1 and len(LANGUAGES) == 18
    sft = _jsonl("sft_addition.jsonl") + _jsonl("sft_counting.jsonl")
    for name, rows in (("sft", sft), ("pairs", _jsonl("dpo_pairs.jsonl"))):
        counts = Counter(r["language"] for r in rows if "task" in r)
        assert set(counts) == FALCON_H1 and min(counts.values()) > 0.9 * max(counts.values()), (name, counts)
    held_out = Counter(r["language"] for r in _jsonl("heldout.jsonl"))  # ~15% of each language's 541 questions
    assert set(held_out) == FALCON_H1 and sum(held_out.values()) == 1438
    assert min(held_out.values()) >= 60  # more than the 40 a language the pipeline evaluates
    assert Counter(r["language"] for r in _jsonl("heldout_pairs.jsonl")) == held_out
    train = {r["messages"][0]["content"] for r in sft if isinstance(r["messages"], list)}
    assert not train & {r["messages"][0]["content"] for r in _jsonl("heldout.jsonl")}


def test_shipped_files_regenerate_byte_for_byte(tmp_path):
    tasks.write_shipped(tmp_path)
    for path in SHIPPED.glob("*.jsonl"):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_every_answer_is_right_and_in_the_digits_0_to_9():
    for row in _jsonl("heldout.jsonl") + _jsonl("sft_addition.jsonl"):
        if "task" not in row:
            continue
        question, answer = row["messages"][0]["content"], row["answer"]
        operands = _numbers(question)
        assert _numbers(answer) == [sum(operands) if row["task"] == "add" else operands[0] + 1], row
        assert row["messages"][1]["content"] == answer
        assert set(answer) <= set("0123456789") and set(re.findall(r"\d", question)) <= set("0123456789"), row
    for pair in _jsonl("heldout_pairs.jsonl"):
        right, wrong = _numbers(pair["chosen"])[0], _numbers(pair["rejected"])[0]
        assert 1 <= abs(right - wrong) <= 2 and set(pair["rejected"]) <= set("0123456789")
    assert tasks.question("ar", "add", (12, 7)) == "كم يساوي 12 زائد 7؟"


def test_korean_topic_particle_follows_the_numbers_reading():
    # 영 일 이 삼 사 오 육 칠 팔 구 십 (0-10), 십이 (12), 이십 (20): 는 after a vowel, 은 after a consonant
    expected = "은은는은는는은은은는은"
    assert "".join(korean_topic(n) for n in range(11)) == expected
    assert (korean_topic(12), korean_topic(19), korean_topic(20)) == ("는", "는", "은")
    assert tasks.question("ko", "add", (3, 4)) == "3 더하기 4는 얼마입니까?"
    assert tasks.question("ko", "add", (4, 3)) == "4 더하기 3은 얼마입니까?"


def test_the_base_tokenizer_covers_every_script_and_every_answer_is_one_token():
    from align.offline.base import offline_tokenizer

    tokenizer = offline_tokenizer(pretraining_documents(4000))
    lengths = Counter()
    for row in _jsonl("heldout.jsonl"):
        question = row["messages"][0]["content"]
        assert tokenizer.decode(tokenizer(question)["input_ids"]) == question
        lengths[len(tokenizer(row["answer"])["input_ids"])] += 1
    assert lengths == {1: 1438}, lengths  # held-out answers included: never split in two
    assert len(tokenizer) < 1024  # the text has fewer merges than asked for: every one was made


def test_exact_match_wants_the_answer_as_written(monkeypatch):
    rows = [
        {
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "language": lang,
            "answer": a,
        }
        for q, a, lang in (
            ("كم يساوي 5 زائد 7؟", "12", "ar"),
            ("كم يساوي 5 زائد 7؟", "12", "ar"),
            ("5加7等于多少？", "12", "zh"),
        )
    ]
    replies = ["12\n", "١٢", " 12"]  # the right number, once in Arabic-Indic digits
    monkeypatch.setattr(evaluation, "generate_replies", lambda model, tokenizer, conversations, **kw: replies)
    result = evaluation.exact_match_by_language(None, None, rows)
    assert result["per_language"] == {"ar": 0.5, "zh": 1.0}
    assert torch.isclose(torch.tensor(result["overall"]), torch.tensor(2 / 3))
