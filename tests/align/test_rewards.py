"""The verifiable rewards of align/rewards.py on hand-made completions."""

import pytest

from align import rewards
from align.rewards import (
    answer_format,
    as_number,
    exact_answer,
    final_answer,
    language_consistency,
    length_penalty,
    reference_answer,
    resolve,
)


def chat(text):
    return [{"role": "assistant", "content": text}]


def test_exact_answer_numeric_and_text_normalisation():
    completions = [
        "17",  # bare
        "Let me add.\n10 + 7 = 17\nAnswer: 17",  # last line, prefix dropped
        "The sum is \\boxed{17.0}.",  # boxed, numerically equal
        "\\boxed{16} no wait \\boxed{34/2}",  # the last box counts
        "18",  # wrong
        "17\nor maybe 18",  # the final line is what counts
        "",  # nothing
        "1,234",  # thousands separator
        " PARIS. ",  # text: case, spaces, punctuation
        "\\boxed{\\frac{1}{2}}",
    ]
    answers = ["17", "17", "17", "17", "17", "17", "17", "1234", "Paris", "0.5"]
    assert exact_answer([chat(c) for c in completions], answers) == [1, 1, 1, 1, 0, 0, 0, 1, 1, 1]
    assert exact_answer(completions, answers) == [1, 1, 1, 1, 0, 0, 0, 1, 1, 1]  # plain-text completions too


def test_reference_answers_from_dataset_formats():
    assert reference_answer("Natalia sold 48 clips ... 48+24 = 72\n#### 72") == "72"  # GSM8K
    assert reference_answer("so the answer is $\\boxed{\\frac{3}{4}}$") == "\\frac{3}{4}"  # MATH
    assert reference_answer(" 42 ") == "42"
    assert as_number("\\frac{3}{4}") == as_number("0.75") == as_number("3/4")
    assert as_number("-1,000.5") == as_number("-1000.5") and as_number("abc") is None and as_number("1/0") is None
    assert final_answer("a\n\n  b  \n") == "b" and final_answer("  ") is None


def test_answer_format():
    completions = ["\\boxed{3}", "\\boxed{3} \\boxed{4}", "\\boxed{}", "work...\n3", "3 " * 40, "", "x\n\\boxed{5}"]
    assert answer_format([chat(c) for c in completions]) == [1, 0, 0, 1, 0, 0, 1]


def test_language_consistency_by_script():
    prompts = [[{"role": "user", "content": q}] for q in ("Что дальше?", "ما هو؟", "What next?", "次は何？", "다음은?")]
    completions = ["Двадцать", "twenty", "twenty", "二十です", "스물"]
    languages = ["ru", "ar", "en", "ja", "ko"]
    assert language_consistency(prompts, [chat(c) for c in completions], language=languages) == [1, 0, 1, 1, 1]
    mixed = language_consistency(prompts[:1], [chat("Два two")], language=["ru"])
    assert mixed == [pytest.approx(3 / 6)]  # 3 Cyrillic letters of 6
    # a bare number has no script: consistent; without a language column the prompt's script decides
    assert language_consistency(prompts[:2], ["21", "واحد"]) == [1.0, 1.0]
    assert language_consistency([[{"role": "user", "content": "12?"}]], ["ok"]) == [None]  # nothing to judge by


def test_length_penalty_is_dapos_soft_overlong_punishment():
    ids = [[0] * n for n in (10, 12, 14, 16, 20)]
    assert length_penalty(ids, max_completion_length=16, buffer=4) == [0, 0, -0.5, -1, -1]
    (bound,) = resolve(["length_penalty"], max_completion_length=16, overlong_buffer=4)
    assert bound(completion_ids=ids) == [0, 0, -0.5, -1, -1] and bound.__name__ == "length_penalty"


def test_rewards_by_name_and_import_path():
    funcs = resolve(["exact_answer", "align.rewards:answer_format"], 8, 2)
    assert funcs == [rewards.exact_answer, rewards.answer_format]
    with pytest.raises(ValueError, match="unknown reward 'exact'"):
        resolve(["exact"], 8, 2)
    with pytest.raises(ValueError, match="cannot import 'align.rewards:nope'"):
        resolve(["align.rewards:nope"], 8, 2)
    with pytest.raises(ValueError, match="name at least one reward"):
        resolve([], 8, 2)
