"""Long context on CPU: the synthetic passkey/lookup generator, the tiny long-context recipe, the passkey eval."""

import math

from transformers import AutoTokenizer

from align import sft
from align.eval import passkey_accuracy
from align.offline.longctx import examples, lookup_example, passkey_example
from model import FalconH1ForCausalLM
from tests.align.test_sft import base  # noqa: F401  (the tiny base checkpoint fixture)


def _words(text):
    return len(text.split())


def test_passkey_sits_at_its_depth_and_lengths_scale():
    rows = {d: passkey_example(400, d, _words, seed=3) for d in (0.0, 0.5, 1.0)}
    positions = []
    for row in rows.values():
        text = row["messages"][0]["content"]
        assert row["answer"] in text and row["messages"][1]["content"] == row["answer"]
        positions.append(text.index(f"The pass key is {row['answer']}") / len(text))
    assert positions[0] < 0.05 and 0.4 < positions[1] < 0.6 and positions[2] > 0.9
    short, long = passkey_example(200, 0.5, _words), passkey_example(2000, 0.5, _words)
    assert 8 < _words(long["messages"][0]["content"]) / _words(short["messages"][0]["content"]) < 12
    two = passkey_example(400, 0.5, _words, seed=3, digits=2)
    assert len(two["answer"]) == 2 and f"The pass key is {two['answer']}." in two["messages"][0]["content"]
    assert [r["task"] for r in examples((60,), _words, 8)].count("lookup") == 2
    assert {r["task"] for r in examples((60,), _words, 8, lookup_every=0)} == {"passkey"}
    assert all(len(r["answer"]) == 2 for r in examples((60,), _words, 8, digits=(2, 2)))
    lookup = lookup_example(600, 4, _words, seed=1)
    question = lookup["messages"][0]["content"]
    n = int(question.rsplit("document ", 1)[1].rstrip("?"))
    assert f"The code of document {n} is {lookup['answer']}." in question


def test_tiny_long_context_recipe_runs_and_the_passkey_eval_scores_it(base, tmp_path):  # noqa: F811
    out = tmp_path / "long"
    argv = ["--config", "recipes/tiny/long-context.yaml", "--model_name_or_path", str(base / "base")]
    trainer = sft.main(
        argv + ["--output_dir", str(out), "--max_steps", "4", "--logging_steps", "1", "--disable_tqdm", "True"]
    )
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) and x > 0.1 for x in losses)  # answers trained: a loss of 0 trains nothing
    model = FalconH1ForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    result = passkey_accuracy(model, tokenizer, lengths=(48, 96), depths=(0.0, 1.0), per_cell=2)
    assert set(result["grid"]) == {48, 96} and set(result["grid"][48]) == {0.0, 1.0}
    assert 0.0 <= result["overall"] <= 1.0


def test_passkey_accuracy_asks_keys_of_the_given_digits(monkeypatch):
    """A reader that finds the key in the prompt scores 1; one that answers a fixed key scores near 0."""
    import re

    from align import eval as evaluation

    asked = []

    def reader(model, tokenizer, conversations, **kw):
        keys = [re.search(r"pass key is (\d+)", c[0]["content"]).group(1) for c in conversations]
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
