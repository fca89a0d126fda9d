"""Long context on CPU: the synthetic passkey/lookup generator, the tiny long-context recipe, the passkey eval."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from align import sft
from align.eval import passkey_accuracy
from align.offline.longctx import (
    OFFLINE_KEYS,
    OFFLINE_LENGTHS,
    OFFLINE_PER_LENGTH,
    examples,
    lookup_example,
    offline_count,
    passkey_example,
)
from model import FalconH1ForCausalLM
from tests.align.helpers import make_tiny_base


def _words(text):
    return len(text.split())


def test_passkey_sits_at_its_depth_and_lengths_scale():
    rows = {d: passkey_example(400, d, _words, seed=3) for d in (0.0, 0.5, 1.0)}
    positions = []
    for row in rows.values():
        text = row["messages"][0]["content"]
        assert row["answer"] in text and row["messages"][1]["content"] == row["answer"]
        positions.append(text.index(f'The pass key is "{row["answer"]}"') / len(text))
    assert positions[0] < 0.05 and 0.4 < positions[1] < 0.6 and positions[2] > 0.9
    short, long = passkey_example(200, 0.5, _words), passkey_example(2000, 0.5, _words)
    assert 8 < _words(long["messages"][0]["content"]) / _words(short["messages"][0]["content"]) < 12
    two = passkey_example(400, 0.5, _words, seed=3, digits=2)
    assert len(two["answer"]) == 2 and f'The pass key is "{two["answer"]}".' in two["messages"][0]["content"]
    spaced = passkey_example(400, 0.5, _words, seed=3, digits=2, spaced=True)
    assert spaced["answer"] == " ".join(two["answer"]) and spaced["messages"][1]["content"] == spaced["answer"]
    assert f'"{spaced["answer"]}" is the pass key' in spaced["messages"][0]["content"]
    assert [r["task"] for r in examples((60,), _words, 8)].count("lookup") == 2
    assert {r["task"] for r in examples((60,), _words, 8, lookup_every=0)} == {"passkey"}
    assert all(len(r["answer"]) == 2 for r in examples((60,), _words, 8, digits=(2, 2)))
    lookup = lookup_example(600, 4, _words, seed=1)
    question = lookup["messages"][0]["content"]
    n = int(question.rsplit("document ", 1)[1].rstrip("?"))
    assert f"The code of document {n} is {lookup['answer']}." in question


@pytest.fixture(scope="module")
def retrieval_base(tmp_path_factory):
    """A randomly initialised 2-layer base, 64 wide with 4 attention heads, and µP-free multipliers: the 0.5B's
    (lm_head 0.04, key 0.39) keep a model this small at chance for far longer than a test can wait."""
    path = tmp_path_factory.mktemp("longctx") / "base"
    return make_tiny_base(
        path, mup=False, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
    )


@pytest.fixture
def one_thread():
    """A model this small gains nothing from more threads, and on a busy machine they cost it up to 10× in time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_tiny_long_context_recipe_trains_every_row_and_learns_passkey_retrieval(retrieval_base, one_thread, tmp_path):
    """The shipped recipe and data, from a random init: every row fits whole, the key's tokens in the text are the
    answer's, every answer trains, and retrieval of held-out passkeys (the recipe's lengths and depths, other seeds)
    rises from chance (1 in 90 keys) to most rows: learned after a plateau of ~200 of the recipe's 600 steps."""
    tokenizer = AutoTokenizer.from_pretrained(retrieval_base)
    recipe = yaml.safe_load(Path("recipes/tiny/long-context.yaml").read_text())
    rows = _rows(recipe["sources"][0]["path"])
    assert rows == examples(OFFLINE_LENGTHS, offline_count, OFFLINE_PER_LENGTH, **OFFLINE_KEYS)  # the file's maker
    lengths = []
    for r in rows:
        ids = tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False)
        answer = tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
        prompt = ids[: -len(answer) - 2]  # without the answer, <|im_end|> and "\n"
        assert ids[len(prompt) : len(prompt) + len(answer)] == answer and len(answer) == 2
        assert any(prompt[i : i + 2] == answer for i in range(len(prompt))), r["answer"]  # the same tokens in the text
        lengths.append(len(ids))
    assert max(lengths) <= recipe["max_length"] and min(lengths) >= 120, (min(lengths), max(lengths))
    asked = [  # what passkey_accuracy asks below: none of it is a training row
        passkey_example(n, d, offline_count, 1000 + i, digits=2, spaced=True)["messages"]
        for n in OFFLINE_LENGTHS
        for d in (0.0, 0.25, 0.5, 0.75, 1.0)
        for i in range(4)
    ]
    assert not {json.dumps(m) for m in asked} & {json.dumps(r["messages"]) for r in rows}

    def retrieval(path):
        model = FalconH1ForCausalLM.from_pretrained(path).eval()
        kw = dict(lengths=OFFLINE_LENGTHS, per_cell=4, count_tokens=offline_count, digits=2, spaced=True)
        return passkey_accuracy(model, tokenizer, **kw)

    before = retrieval(retrieval_base)
    out = tmp_path / "long"
    argv = ["--config", "recipes/tiny/long-context.yaml", "--model_name_or_path", str(retrieval_base)]
    trainer = sft.main(argv + ["--output_dir", str(out), "--disable_tqdm", "True"])
    report = json.loads((out / "mixture_report.json").read_text())[0]
    assert report["raw_rows"] == report["train_rows"] == len(rows)  # nothing dropped, cut or held back
    assert report["too_long"] == report["truncated"] == report["duplicates"] == 0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[0] > 1.0 and sum(losses[-4:]) / 4 < 0.5 * losses[0], losses  # answers train: loss 0 trains nothing
    after = retrieval(out)
    assert set(after["grid"]) == set(OFFLINE_LENGTHS) and len(after["grid"][OFFLINE_LENGTHS[-1]]) == 5
    assert before["overall"] <= 0.05 and after["overall"] >= before["overall"] + 0.7, (before, after)


def test_passkey_accuracy_asks_keys_of_the_given_digits(monkeypatch):
    """A reader that finds the key in the prompt scores 1; one that answers a fixed key scores near 0."""
    import re

    from align import eval as evaluation

    asked = []

    def reader(model, tokenizer, conversations, **kw):
        keys = [re.search(r'pass key is "([\d ]+)"', c[0]["content"]).group(1) for c in conversations]
        asked.extend(keys)
        return [k if model == "reads" else "12" for k in keys]

    monkeypatch.setattr(evaluation, "generate_replies", reader)
    kw = dict(lengths=(20, 40), depths=(0.0, 1.0), per_cell=3, count_tokens=_words)
    assert passkey_accuracy("reads", None, digits=2, **kw)["overall"] == 1.0
    assert len(asked) == 12 and all(len(k) == 2 for k in asked)
    assert passkey_accuracy("fixed", None, digits=2, **kw)["overall"] < 0.2
    asked.clear()
    passkey_accuracy("reads", None, **kw)
    assert all(len(k) == 5 for k in asked)  # five digits by default, as the long recipes' rows


def test_long_rows_ask_for_expandable_segments(monkeypatch):
    """activation_offload / context parallelism switch the CUDA allocator to expandable segments, unless the
    user's PYTORCH_CUDA_ALLOC_CONF says otherwise (the 7B at 524,288 tokens ran out of memory without them)."""
    from align import models

    asked = []
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(models.torch.cuda.memory, "_set_allocator_settings", asked.append)
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    assert models.expandable_segments() and asked == ["expandable_segments:True"]
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # either of the user's settings is kept
        with monkeypatch.context() as env:
            env.setenv(name, "backend:cudaMallocAsync")
            assert not models.expandable_segments() and asked == ["expandable_segments:True"]
