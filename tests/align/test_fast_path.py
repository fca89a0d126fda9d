"""The training path a stage takes: `gradient_checkpointing: auto` through the recipe parser, and the decisions the
shipped recipes get on a CPU and on an 80 GB card (the card simulated: the planner's arithmetic, no GPU)."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from align import dpo, fast_path, sft
from model import FalconH1ForCausalLM, preset_config
from tests.align.test_sft import COMMON, base  # noqa: F401  (the tiny base checkpoint + jsonl mix)
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[2] / "recipes"
CPU = ["--use_cpu", "True", "--bf16", "False"]


def _recipe(tmp_path, **fields) -> str:
    recipe = yaml.safe_load((ROOT / "tiny" / "sft.yaml").read_text())
    recipe.pop("gradient_checkpointing")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**recipe, **fields}))
    return str(path)


@pytest.mark.parametrize(
    "recipe, cli, auto, value",
    [
        ({}, [], True, None),  # left out: auto
        ({"gradient_checkpointing": "auto"}, [], True, None),
        ({"gradient_checkpointing": True}, [], False, True),
        ({"gradient_checkpointing": True}, ["--gradient_checkpointing", "auto"], True, None),
        ({"gradient_checkpointing": "auto"}, ["--gradient_checkpointing", "false"], False, False),
        ({}, ["--gradient_checkpointing=auto"], True, None),
    ],
)
def test_gradient_checkpointing_auto_parses(tmp_path, recipe, cli, auto, value):
    align_args, sft_args, _ = sft.parse(["--config", _recipe(tmp_path, **recipe), *cli, *CPU])
    assert align_args.auto_checkpointing is auto
    if value is not None:
        assert sft_args.gradient_checkpointing is value


def _gpu_decision(monkeypatch, recipe: Path, script):
    """The path `recipe` gets on one 80 GB CUDA card, for a model of its preset's shape (on the meta device)."""
    align_args, args, model_args = script.parse(["--config", str(recipe), *CPU])
    size = recipe.parts[-3].removeprefix("falcon-h1-")
    with torch.device("meta"):
        model = FalconH1ForCausalLM(preset_config(size))
    if model_args.use_peft:  # a LoRA parameter is what tells the planner the method
        model.model.layers[0].self_attn.q_proj.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(1)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 80 * 2**30}))
    padding_free = bool(getattr(args, "padding_free", False) or getattr(args, "packing", False))
    return fast_path.decide(model, align_args, args, padding_free, pairs=script is dpo)


@pytest.mark.parametrize(
    "recipe, checkpointing",
    [
        ("falcon-h1-0.5b/sft/full.yaml", False),  # 16,384 tokens: ~25 GiB planned without checkpointing
        ("falcon-h1-1.5b-deep/sft/lora.yaml", True),  # 4 × 8,192 tokens of LoRA activations do not fit
        ("falcon-h1-7b/sft/full.yaml", True),  # 7B weights, gradients and AdamW alone take ~56 GB
        ("falcon-h1-0.5b/dpo/full.yaml", False),
    ],
)
def test_shipped_recipes_take_the_fastest_path_that_fits(monkeypatch, recipe, checkpointing):
    path = _gpu_decision(monkeypatch, ROOT / recipe, dpo if "/dpo/" in recipe else sft)
    assert path.compile_layers
    assert path.checkpointing is checkpointing, path.describe()
    assert path.graphs is not checkpointing, path.describe()  # graphs wherever no recompute is needed
    if path.graphs:  # documents up to max_length; slots for what a micro-batch holds (the varlen kernel's launch)
        raw = yaml.safe_load((ROOT / recipe).read_text())
        assert path.graph_tokens >= 8192 and path.graph_doc_len == raw["max_length"]
        fillers = -(-path.graph_tokens // path.graph_doc_len)
        if "/dpo/" in recipe:  # each pair's chosen and rejected sequences
            assert path.graph_doc_slots == 2 * raw["per_device_train_batch_size"] + fillers
        else:  # packed rows: the slots come from the packed data once the Trainer has it
            assert path.slots_from_data and "document slots from the packed rows" in path.describe()


def test_packed_rows_set_the_document_slots(tmp_path):
    """fit_doc_slots reads the most documents a packed row holds from TRL's `seq_lengths`: the captured slots are
    those × the micro-batch's rows + the fillers; a dataset without the column keeps the placeholder."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    rows = Dataset.from_dict({"input_ids": [[1] * n for n in (5, 3, 9, 2, 2, 1, 7, 4)]})
    packed = pack_dataset(rows, seq_length=10, strategy="bfd")
    most = max(len(x) for x in packed["seq_lengths"])
    train_args = type("A", (), {"per_device_train_batch_size": 2})()
    path = fast_path.TrainingPath(True, True, False, 20, 64, 10, slots_from_data=True)
    fast_path.fit_doc_slots(path, packed, train_args)
    assert most >= 2 and path.graph_doc_slots == 2 * most + 2 and not path.slots_from_data

    path = fast_path.TrainingPath(True, True, False, 20, 64, 10, slots_from_data=True)
    fast_path.fit_doc_slots(path, rows, train_args)  # no seq_lengths: the placeholder stays
    assert path.graph_doc_slots == 64


def test_pairs_set_the_token_budget():
    """fit_pair_tokens: DPO's captured budget is what the `batch` longest pairs hold (each sequence cut at max_length),
    rounded up, not batch × 2 × max_length; the slots follow. A recipe's own budget, or missing columns, keep it."""
    from datasets import Dataset

    lengths = [(30, 50, 10), (5, 5, 5), (200, 100, 120), (10, 400, 20)]  # prompt, chosen, rejected
    pairs = Dataset.from_dict(
        {name: [[1] * row[i] for row in lengths] for i, name in enumerate(("prompt_ids", "chosen_ids", "rejected_ids"))}
    )
    train_args = type("A", (), {"per_device_train_batch_size": 2})()

    def path(**kw):
        return fast_path.TrainingPath(True, True, False, 2 * 2 * 256, 4 + 4, 256, tokens_from_data=True, **kw)

    fitted = path()
    fast_path.fit_pair_tokens(fitted, pairs, train_args, multiple=64)
    longest = (256 + 256) + (256 + 30)  # 300 and 310 cut at 256; 410 cut at 256, then 30
    assert fitted.graph_tokens == 832 == -(-longest // 64) * 64 and fitted.graph_doc_slots == 4 + 4
    assert not fitted.tokens_from_data
    fitted = path()
    fast_path.fit_pair_tokens(fitted, pairs.select([0, 1]), train_args, multiple=64)  # 90 + 40 and 10 + 10
    assert fitted.graph_tokens == 192 and fitted.graph_doc_slots == 4 + 1
    kept = path()
    kept.tokens_from_data = False  # graph_tokens from the recipe
    fast_path.fit_pair_tokens(kept, pairs, train_args)
    assert kept.graph_tokens == 1024
    kept = path()
    fast_path.fit_pair_tokens(kept, pairs.remove_columns("prompt_ids"), train_args)
    assert kept.graph_tokens == 1024


def test_pair_budgets_are_the_least_mean_budget():
    """pair_budgets: the smaller budgets are where micro-batches of random pairs land, chosen for the least mean
    budget a micro-batch replays over the draws (checked against every choice of sizes), ascending, below the top."""
    import itertools

    import numpy as np

    pairs = np.random.default_rng(1).integers(40, 900, 50)
    batch, top, multiple = 4, 4096, 128
    sizes, counts = fast_path.micro_batch_sizes(pairs, batch, top, multiple)

    def mean_budget(rungs):
        return sum(c * min(b for b in [*rungs, top] if b >= s) for s, c in zip(sizes, counts)) / sum(counts)

    means = [mean_budget([])]
    for count in (2, 3):
        got = fast_path.pair_budgets(pairs, batch, count, top, multiple)
        assert len(got) == count - 1 and got == sorted(got) and got[-1] < top
        assert mean_budget(got) == pytest.approx(min(map(mean_budget, itertools.combinations(sizes, count - 1))))
        means.append(mean_budget(got))
    assert means[2] < means[1] < means[0] == top
    assert fast_path.pair_budgets(pairs, batch, 1, top, multiple) == []
    assert fast_path.pair_budgets([100] * 9, 2, 4, 512, 64) == [256]  # one size: one rung saves all there is


def test_pairs_set_budgets_the_memory_holds():
    """fit_pair_tokens with several budgets: the smaller ones below the fitted top, as many as asked; none where the
    planner's headroom cannot hold a rung's gradients and layer buffers; a recipe's graph_tokens keeps the top."""
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(2)
    lengths = rng.integers(8, 200, (40, 3))
    pairs = Dataset.from_dict(
        {
            name: [[1] * int(row[i]) for row in lengths]
            for i, name in enumerate(("prompt_ids", "chosen_ids", "rejected_ids"))
        }
    )
    train_args = type("A", (), {"per_device_train_batch_size": 4})()
    model = tiny_model()

    def path(**kw):
        return fast_path.TrainingPath(True, True, False, 4 * 2 * 512, 8 + 16, 512, budget_count=4, **kw)

    fitted = path(tokens_from_data=True)
    fast_path.fit_pair_tokens(fitted, pairs, train_args, multiple=64, model=model)
    assert len(fitted.graph_budgets) == 3 and fitted.graph_budgets[-1] < fitted.graph_tokens < 4 * 2 * 512
    tight = path(tokens_from_data=True, headroom_gib=1e-6)
    fast_path.fit_pair_tokens(tight, pairs, train_args, multiple=64, model=model)
    assert tight.graph_budgets == [] and tight.graph_tokens == fitted.graph_tokens
    kept = path()  # graph_tokens from the recipe: budgets below it
    fast_path.fit_pair_tokens(kept, pairs, train_args, multiple=64, model=model)
    assert kept.graph_tokens == 4096 and len(kept.graph_budgets) == 3 and kept.graph_doc_slots == 24


def test_cpu_runs_eager_without_checkpointing(tmp_path):
    align_args, sft_args, _ = sft.parse(["--config", _recipe(tmp_path), *CPU])
    model = tiny_model()
    path = fast_path.decide(model, align_args, sft_args, padding_free=True)
    assert (path.compile_layers, path.graphs, path.checkpointing) == (False, False, False)
    assert "checkpointing off: auto, on CPU" in path.describe()


def test_graphs_refused_without_padding_free_rows(tmp_path):
    align_args, sft_args, _ = sft.parse(["--config", _recipe(tmp_path, training_graphs=True), *CPU])
    with torch.device("meta"):
        model = FalconH1ForCausalLM(preset_config("0.5b"))
    with pytest.raises(ValueError, match="padding-free"):
        fast_path.decide(model, align_args, sft_args, padding_free=False)


def test_runtime_settings_from_a_recipe_or_the_command_line(tmp_path):
    """`runtime:` reaches model.settings as a mapping in YAML and as JSON on the command line."""
    align_args, _, _ = sft.parse(["--config", _recipe(tmp_path, runtime={"kernels": "reference"}), *CPU])
    assert align_args.runtime == {"kernels": "reference"}
    align_args, _, _ = sft.parse(["--config", _recipe(tmp_path), "--runtime", '{"compile_loss": false}', *CPU])
    assert align_args.runtime == {"compile_loss": False}


def test_align_sft_sizes_the_slots_from_its_packed_rows(tmp_path, monkeypatch, base):  # noqa: F811
    """align/sft.py hands the Trainer's packed training set to fit_doc_slots before training (the capture itself
    needs CUDA: here the decision is forced and the capture and training are left out)."""
    decided = {}

    def graphs_path(model, align_args, train_args, padding_free, pairs=False):
        decided["path"] = fast_path.TrainingPath(False, True, False, 4 * 128, 64, 128, slots_from_data=True)
        return decided["path"]

    monkeypatch.setattr(sft, "decide", graphs_path)
    monkeypatch.setattr(sft, "apply", lambda path, model, train_args: [])
    monkeypatch.setattr(sft, "train_and_save", lambda trainer, *args: None)
    sources = json.dumps([{"path": str(base / "mix.jsonl"), "language_column": "language"}])
    argv = ["--model_name_or_path", str(base / "base"), "--output_dir", str(tmp_path), "--sources", sources]
    trainer = sft.main(argv + COMMON + ["--packing", "True"])
    most = max(len(lengths) for lengths in trainer.train_dataset["seq_lengths"])
    assert 1 < most and 4 * most + 4 != 64 and decided["path"].graph_doc_slots == 4 * most + 4
