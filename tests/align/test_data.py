"""Mixtures: exact weighted row counts, malformed rows counted and reported, thresholds, dedup, reports."""

import json

import pytest

from align.data import MixtureConfig, MixtureError, SourceConfig, build_mixture, write_report


def _rows(n, lang="en", prefix="q"):
    return [
        {
            "messages": [{"role": "user", "content": f"{prefix}{i}"}, {"role": "assistant", "content": f"a{i}"}],
            "language": lang,
        }
        for i in range(n)
    ]


def _loader(table):
    return lambda source: table[source.path]


@pytest.mark.parametrize("weight, expected", [(1.0, 40), (0.25, 10), (3.5, 140), (2.0, 80), (0.0, 0), (1.33, 53)])
def test_weights_give_exact_row_counts(weight, expected):
    cfg = MixtureConfig(sources=[SourceConfig(path="a", weight=weight)], seed=1)
    train, _, reports = build_mixture(cfg, loader=_loader({"a": _rows(40)}))
    assert len(train) == expected == reports[0].train_rows
    if weight >= 1:  # every row appears at least floor(weight) times
        counts = {}
        for r in train:
            key = r["messages"][0]["content"]
            counts[key] = counts.get(key, 0) + 1
        assert min(counts.values()) >= int(weight) and len(counts) == 40


def test_language_weights_and_eval_split():
    table = {"a": _rows(30, "en") + _rows(20, "fr", prefix="f")}
    cfg = MixtureConfig(
        sources=[SourceConfig(path="a", weight=2.0, language_column="language")],
        language_weights={"fr": 0.5},
        eval_fraction=0.2,
        seed=0,
    )
    train, held_out, reports = build_mixture(cfg, loader=_loader(table))
    assert len(held_out) == 10
    rep = reports[0]
    n_en = sum(r["language"] == "en" for r in held_out)
    assert rep.rows_per_language == {"en": 2 * (30 - n_en), "fr": round(1.0 * (20 - (10 - n_en)))}
    held = {json.dumps(r["messages"]) for r in held_out}
    assert not any(json.dumps(r["messages"]) in held for r in train)  # held-out rows never reach training


def test_malformed_rows_are_counted_reported_and_fail_past_threshold(tmp_path):
    bad = [
        {"messages": [{"role": "user", "content": "hi"}]},  # no assistant turn
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},  # empty
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},  # bad role
        {"messages": [{"content": "x"}]},  # missing role
        {"messages": "text"},  # wrong type
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},  # wrong type
    ]
    table = {"a": _rows(94) + bad}
    cfg = MixtureConfig(sources=[SourceConfig(path="a")], max_malformed_fraction=0.1)
    train, _, reports = build_mixture(cfg, loader=_loader(table))
    rep = reports[0]
    assert rep.malformed == 6 and len(train) == 94 and rep.raw_rows == 100
    assert sum(rep.malformed_reasons.values()) == 6 and len(rep.malformed_reasons) == 6
    md = write_report(reports, tmp_path).read_text()
    assert "6 rows" in md and "no assistant turn" in md and "row 94" in md
    assert json.loads((tmp_path / "mixture_report.json").read_text())[0]["malformed"] == 6
    with pytest.raises(MixtureError, match=r"^a: 6 of 100 rows malformed.*first: row 94: no assistant turn"):
        build_mixture(
            MixtureConfig(sources=[SourceConfig(path="a")], max_malformed_fraction=0.05), loader=_loader(table)
        )


def test_exact_duplicates_and_length_filter_are_counted():
    rows = _rows(10) + _rows(3)  # 3 exact duplicates
    rows.append({"messages": [{"role": "user", "content": "x" * 500}, {"role": "assistant", "content": "y"}]})
    cfg = MixtureConfig(sources=[SourceConfig(path="a")], max_chars=100)
    train, _, reports = build_mixture(cfg, loader=_loader({"a": rows}))
    assert (reports[0].duplicates, reports[0].length_filtered, len(train)) == (3, 1, 10)


def test_prompt_response_columns_and_local_jsonl(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"q{i}", "a": f"a{i}", "lang": "de"}) for i in range(5)))
    cfg = MixtureConfig(
        sources=[SourceConfig(path=str(path), prompt_column="q", response_column="a", language_column="lang")]
    )
    train, _, reports = build_mixture(cfg)
    assert len(train) == 5 and train[0]["messages"][1]["role"] == "assistant"
    assert reports[0].rows_per_language == {"de": 5}


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"messages": []}\n{not json\n')
    with pytest.raises(MixtureError, match=r"broken\.jsonl:2"):
        build_mixture(MixtureConfig(sources=[SourceConfig(path=str(path))]))


def _pairs(n, lang="en"):
    return [{"prompt": f"q{i}?", "chosen": f"right {i}", "rejected": f"wrong {i}", "language": lang} for i in range(n)]


def _preference(weight=1.0, **source):
    return MixtureConfig(
        kind="preference",
        sources=[SourceConfig(path="p", weight=weight, prompt_column="prompt", language_column="language", **source)],
        seed=3,
        max_malformed_fraction=0.5,
    )


def test_preference_pairs_weights_and_format():
    train, _, reports = build_mixture(_preference(weight=2.5), loader=_loader({"p": _pairs(10)}))
    assert len(train) == 25 == reports[0].train_rows
    row = train[0]
    assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
    assert row["chosen"] != row["rejected"] and reports[0].train_tokens > 0


def test_malformed_preference_pairs_are_counted_with_reasons():
    bad = [
        {"prompt": "q?", "chosen": "same", "rejected": "same", "language": "en"},
        {"prompt": "q?", "chosen": "fine", "rejected": "", "language": "en"},
        {"prompt": "q?", "chosen": "fine", "language": "en"},
        {"prompt": "", "chosen": "a", "rejected": "b", "language": "en"},
        {"prompt": "q?", "chosen": 3, "rejected": "b", "language": "en"},
    ]
    train, _, reports = build_mixture(_preference(), loader=_loader({"p": _pairs(6) + bad}))
    rep = reports[0]
    assert len(train) == 6 and rep.malformed == 5
    assert rep.malformed_reasons == {
        "chosen and rejected are identical": 1,
        "'rejected' missing or empty": 2,  # an empty string and an absent field
        "'prompt' missing or empty": 1,
        "'chosen'/'rejected' is neither text nor a message list": 1,
    }
    with pytest.raises(MixtureError, match="5 of 11 rows malformed"):
        cfg = _preference()
        cfg.max_malformed_fraction = 0.1
        build_mixture(cfg, loader=_loader({"p": _pairs(6) + bad}))


def test_implicit_prompt_from_whole_conversations():
    """UltraFeedback-binarized layout: chosen/rejected are whole conversations; the shared turns are the prompt."""
    user = {"role": "user", "content": "Name a colour."}
    row = {
        "chosen": [user, {"role": "assistant", "content": "Blue."}],
        "rejected": [user, {"role": "assistant", "content": "Seven."}],
    }
    cfg = MixtureConfig(kind="preference", sources=[SourceConfig(path="p")])
    train, _, _ = build_mixture(cfg, loader=_loader({"p": [row]}))
    assert train[0]["prompt"] == [user]
    assert train[0]["chosen"] == [{"role": "assistant", "content": "Blue."}]
    assert train[0]["rejected"] == [{"role": "assistant", "content": "Seven."}]


def test_completions_that_repeat_the_prompt_are_trimmed_with_a_system_column():
    user = {"role": "user", "content": "Name a colour."}
    row = {
        "prompt": "Name a colour.",
        "system": "Be brief.",
        "chosen": [user, {"role": "assistant", "content": "Blue."}],
        "rejected": [user, {"role": "assistant", "content": "Seven."}],
    }
    source = SourceConfig(path="p", prompt_column="prompt", system_column="system")
    train, _, reports = build_mixture(MixtureConfig(kind="preference", sources=[source]), loader=_loader({"p": [row]}))
    assert reports[0].malformed == 0
    assert train[0]["prompt"] == [{"role": "system", "content": "Be brief."}, user]
    assert train[0]["chosen"] == [{"role": "assistant", "content": "Blue."}]


def _turns(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_rows_whose_answer_starts_past_max_length_are_dropped_counted_and_shown(tmp_path):
    """Character lengths here (the default measure): a row longer than max_length whose answer starts past it
    would train nothing and is dropped; one that keeps part of its answer is trained and counted as truncated."""
    rows = _rows(6) + [_turns("x" * 100, "a"), _turns("z" * 60, "b"), _turns("q" * 30, "y" * 50)]
    cfg = MixtureConfig(sources=[SourceConfig(path="a")], max_length=40)
    train, _, reports = build_mixture(cfg, loader=_loader({"a": rows}))
    rep = reports[0]
    assert (rep.too_long, rep.truncated, rep.valid_rows, len(train)) == (2, 1, 7, 7)
    assert rep.too_long_examples == [
        {"row": 6, "tokens": 101, "answer_at": 100},
        {"row": 7, "tokens": 61, "answer_at": 60},
    ]
    md = write_report(reports, tmp_path).read_text()
    assert "| a | 1.0 | 9 | 0 | 0 | 0 | 1 | 2 | 0 | 7 |" in md
    assert "Rows too long for max_length" in md and "row 6: 101 tokens, the answer starts at token 100" in md
    # without a cut nothing is dropped; a preference pair is measured by its prompt
    assert len(build_mixture(MixtureConfig(sources=[SourceConfig(path="a")]), loader=_loader({"a": rows}))[0]) == 9
    pairs = [{"prompt": "p" * 50, "chosen": "c", "rejected": "r", "language": "en"}] + _pairs(3)
    cut = _preference()
    cut.max_length = 20
    _, _, reports = build_mixture(cut, loader=_loader({"p": pairs}))
    assert (reports[0].too_long, reports[0].train_rows) == (1, 3)


def test_token_lengths_put_the_answer_where_the_chat_template_does():
    from align.models import chat_ids
    from align.offline.base import build_tokenizer
    from align.stage import TokenLengths

    tok = build_tokenizer(["What is 2 plus 3? It is 5. Be brief."], vocab_size=300)
    measure = TokenLengths(tok)
    system = {"role": "system", "content": "Be brief."}
    row = {"messages": [system] + _turns("What is 2 plus 3?", "It is 5.")["messages"]}
    ids = chat_ids(tok, row["messages"])
    assert measure(row) == (len(ids), len(ids))
    assert tok.decode(ids[measure.answer_at(row) :]).startswith("It is 5.")
    pair = {
        "prompt": row["messages"][:2],
        "chosen": [_turns("", "5")["messages"][1]],
        "rejected": [_turns("", "6")["messages"][1]],
    }
    tokens, longest = measure(pair)
    assert tokens == 2 * longest == 2 * len(chat_ids(tok, pair["prompt"] + pair["chosen"]))
    assert tok.decode(chat_ids(tok, pair["prompt"] + pair["chosen"])[measure.answer_at(pair) :]).startswith("5")
