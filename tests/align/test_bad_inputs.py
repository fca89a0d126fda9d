"""Bad input of every kind a user can hand in gets an error that names the culprit: the file, the line or row, and
the field. One table: each case writes its bad input, runs the code that reads it, and states the message."""

import json
import re

import pytest
import torch
import yaml

from align import sft
from align.args import AlignArguments
from align.data import MixtureConfig, SourceConfig, build_mixture
from align.models import load_model, load_tokenizer
from tests.conftest import tiny_model

GOOD_ROW = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
RECIPE = {"model_name_or_path": "runs/offline/base", "output_dir": "runs/x", "sources": [{"path": "d.jsonl"}]}


def _recipe(tmp_path, change: dict | None = None, text: str | None = None):
    """Writes a recipe (the small valid one above with `change` applied, or raw `text`) and parses it."""
    path = tmp_path / "recipe.yaml"
    path.write_text(text if text is not None else yaml.safe_dump({**RECIPE, **(change or {})}, sort_keys=False))
    return lambda: sft.parse(["--config", str(path), "--use_cpu", "True"])


def _data(tmp_path, name: str, content, **source):
    """Writes a data file (bytes, or rows as JSON lines) and builds an SFT mixture from it."""
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in content))
    return _mixture(path, **source)


def _mixture(path, max_length=None, **source):
    return lambda: build_mixture(MixtureConfig(sources=[SourceConfig(path=str(path), **source)], max_length=max_length))


def _folder(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    return _mixture(tmp_path / "d.jsonl")


def _long_row(tmp_path):
    row = {"messages": [{"role": "user", "content": "a long question"}, {"role": "assistant", "content": "a"}]}
    return _data(tmp_path, "d.jsonl", [row], max_length=5)


def _model(path, **align):
    from trl import ModelConfig

    return lambda: load_model(ModelConfig(model_name_or_path=str(path)), AlignArguments(**align))


def _truncated_checkpoint(tmp_path):
    tiny_model().save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return _model(tmp_path / "ckpt")


def _tokenizer_without_template(tmp_path):
    from trl import ModelConfig

    from align.offline.base import build_tokenizer

    tok = build_tokenizer(["one two three"], vocab_size=300)
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    args = AlignArguments(chat_template="tokenizer")
    return lambda: load_tokenizer(ModelConfig(model_name_or_path=str(tmp_path / "tok")), args)


def _memory(argv):
    from model.memory import main

    return lambda: main(argv)


def _recipe_file(tmp_path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return str(path)


# (case, build: tmp_path → a call that must fail, the message it must give: a regex over str(error))
CASES = [
    # the examples
    (
        "non-UTF-8 bytes",
        lambda t: _data(t, "d.jsonl", b'{"messages": []}\n{"messages": "caf\xe9"}\n'),
        r"d\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 18\)",
    ),
    (
        "language of the wrong type",
        lambda t: _recipe(t, {"sources": [{"path": "d.jsonl", "language": 3}]}),
        r"recipe\.yaml:5: sources\[0\]\.language: expected text or null, got 3 \(an integer\)",
    ),
    (
        "row language of the wrong type",
        lambda t: _data(t, "d.jsonl", [{**GOOD_ROW, "lang": ["en"]}], language_column="lang"),
        r"d\.jsonl: 1 of 1 rows malformed .*first: line 1: 'lang' is not text",
    ),
    (
        "weight given as text",
        lambda t: _recipe(t, {"sources": [{"path": "d.jsonl", "weight": "2"}]}),
        r"recipe\.yaml:5: sources\[0\]\.weight: expected a number, got '2' \(text\)",
    ),
    (
        "negative max_length",
        lambda t: _recipe(t, {"max_length": -5}),
        r"recipe\.yaml:\d+: max_length: must be an integer ≥ 1 or null, got -5",
    ),
    ("truncated model.safetensors", _truncated_checkpoint, r"model_name_or_path: .*ckpt/model\.safetensors is damaged"),
    (
        "checkpoint folder that does not exist",
        lambda t: _model(t / "no-such-run"),
        r"model_name_or_path: .*no-such-run: no such checkpoint folder",
    ),
    ("context parallel 0", lambda t: _memory(["--context-parallel", "0"]), r"^2$"),  # argparse: exit status 2
    # beyond them: data files
    ("empty data file", lambda t: _data(t, "d.jsonl", b""), r"d\.jsonl: no rows: the source is empty"),
    ("blank lines only", lambda t: _data(t, "d.jsonl", b"\n  \n\n"), r"d\.jsonl: no rows"),
    (
        "invalid JSON line",
        lambda t: _data(t, "d.jsonl", b'{"messages": []}\n{"messages": [\n'),
        r"d\.jsonl:2: not valid JSON",
    ),
    (
        "duplicate keys in a row",
        lambda t: _data(t, "d.jsonl", b'{"messages": [], "messages": []}\n'),
        r"d\.jsonl:1: key 'messages' appears twice in one object",
    ),
    (
        "missing messages key",
        lambda t: _data(t, "d.jsonl", [{"conversation": GOOD_ROW["messages"]}]),
        r"d\.jsonl: 1 of 1 rows malformed .*line 1: 'messages' missing or not a list",
    ),
    (
        "wrong role",
        lambda t: _data(t, "d.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}]),
        r"line 1: unknown role 'robot'",
    ),
    (
        "role that is not text",
        lambda t: _data(t, "d.jsonl", [{"messages": [{"role": ["user"], "content": "x"}]}]),
        r"line 1: unknown role \['user'\]",
    ),
    (
        "empty content",
        lambda t: _data(t, "d.jsonl", [{"messages": [{"role": "user", "content": " "}]}]),
        r"line 1: empty message content",
    ),
    ("row that is not an object", lambda t: _data(t, "d.jsonl", [["user", "hi"]]), r"line 1: row is not an object"),
    (
        "JSON file that is not a list",
        lambda t: _data(t, "d.json", b'{"messages": []}'),
        r"d\.json: expected a JSON list of rows, got \{",
    ),
    ("data file that does not exist", lambda t: _mixture(t / "missing.jsonl"), r"missing\.jsonl: no such data file"),
    ("folder instead of a file", _folder, r"d\.jsonl: is a folder; expected a \.jsonl file"),
    ("unsupported file type", lambda t: _data(t, "d.csv", b"q,a\n1,2\n"), r"d\.csv: unsupported file type '\.csv'"),
    ("every answer past max_length", _long_row, r"no training rows left; per source: .*1 too long for max_length"),
    # beyond them: recipes
    (
        "unknown recipe key",
        lambda t: _recipe(t, {"learning_rat": 1e-4}),
        r"recipe\.yaml:\d+: learning_rat: unknown key \(did you mean 'learning_rate'\?\)",
    ),
    (
        "unknown source key",
        lambda t: _recipe(t, {"sources": [{"path": "d.jsonl", "wieght": 2}]}),
        r"recipe\.yaml:5: sources\[0\]\.wieght: unknown key \(did you mean 'weight'\?\)",
    ),
    (
        "source without a path",
        lambda t: _recipe(t, {"sources": [{"weight": 2}]}),
        r"recipe\.yaml:\d+: sources\[0\]: missing 1 required positional argument: 'path'",
    ),
    (
        "sources that are not a list",
        lambda t: _recipe(t, {"sources": "d.jsonl"}),
        r"recipe\.yaml:\d+: sources: expected a list of sources, got 'd\.jsonl' \(text\)",
    ),
    (
        "a list where a number goes",
        lambda t: _recipe(t, {"num_train_epochs": [1]}),
        r"recipe\.yaml:\d+: num_train_epochs: must be a number > 0, got \[1\] \(a list\)",
    ),
    (
        "repeated recipe key",
        lambda t: _recipe(t, text="model_name_or_path: a\nlearning_rate: 1\nlearning_rate: 2\n"),
        r"recipe\.yaml:3: key 'learning_rate' appears twice \(lines 2 and 3\)",
    ),
    (
        "recipe that is not YAML",
        lambda t: _recipe(t, text="model_name_or_path: a\nsources: [\n  {path: d\n"),
        r"recipe\.yaml:\d+: not valid YAML",
    ),
    (
        "recipe that is a list",
        lambda t: _recipe(t, text="- model_name_or_path: a\n"),
        r"recipe\.yaml: a recipe is a mapping of settings, got \[",
    ),
    (
        "recipe file that does not exist",
        lambda t: lambda: sft.parse(["--config", str(t / "nope.yaml")]),
        r"--config: .*nope\.yaml: no such recipe file",
    ),
    (
        "unknown chat template",
        lambda t: _recipe(t, {"chat_template": "chatml"}),
        r"recipe\.yaml:\d+: chat_template: must be one of auto, falcon_h1, tokenizer; got 'chatml'",
    ),
    (
        "tokenizer chat template that is missing",
        _tokenizer_without_template,
        r"chat_template: tokenizer: the tokenizer of .*tok has no chat template",
    ),
    (
        "eval_fraction of 1 or more",
        lambda t: _recipe(t, {"eval_fraction": 1.5}),
        r"recipe\.yaml:\d+: eval_fraction: must be a number in \[0, 1\), got 1\.5",
    ),
    (
        "batch size 0",
        lambda t: _recipe(t, {"per_device_train_batch_size": 0}),
        r"recipe\.yaml:\d+: per_device_train_batch_size: must be an integer ≥ 1, got 0",
    ),
    (
        "language weight given as text",
        lambda t: _recipe(t, {"language_weights": {"fr": "high"}}),
        r"recipe\.yaml:\d+: language_weights: expected a mapping of text to a number or null, got \{'fr': 'high'\}",
    ),
    (
        "command-line flag out of range",
        lambda t: lambda: sft.parse(["--config", _recipe_file(t), "--use_cpu", "True", "--max_length", "0"]),
        r"^--max_length: must be an integer ≥ 1 or null, got 0",
    ),
    (
        "--sources that is broken JSON",
        lambda t: (
            lambda: sft.parse(["--config", _recipe_file(t), "--use_cpu", "True", "--sources", '[{"path": "d.jsonl"'])
        ),
        r"--sources: expected JSON",
    ),
]


@pytest.mark.parametrize("build, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_named(tmp_path, build, message):
    call = build(tmp_path)
    with pytest.raises((ValueError, SystemExit)) as caught:
        call()
    assert re.search(message, str(caught.value)), str(caught.value)


def test_input_ids_and_labels_outside_the_vocabulary_are_named():
    model = tiny_model()  # vocabulary 97
    ids = torch.tensor([[5, 6, 7, 97]])
    with pytest.raises(ValueError, match=r"input_ids hold 1 token id\(s\) outside the vocabulary \[0, 97\)"):
        model(ids)
    with pytest.raises(ValueError, match=r"labels hold 1 token id\(s\) outside the vocabulary \[0, 97\)"):
        model(ids[:, :3], labels=torch.tensor([[5, 6, 120]]))


def test_the_memory_planner_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        _memory(["--context-parallel", "0"])()
    assert "argument --context-parallel: must be > 0, got 0" in capsys.readouterr().err
