"""The training path a stage takes: `gradient_checkpointing: auto` through the recipe parser, and the decisions the
shipped recipes get on a CPU and on an 80 GB card (the card simulated: the planner's arithmetic, no GPU)."""

from pathlib import Path

import pytest
import torch
import yaml

from align import dpo, fast_path, sft
from model import FalconH1ForCausalLM, preset_config
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[2] / "recipes"
CPU = ["--use_cpu", "True", "--bf16", "False"]


def _recipe(tmp_path, **fields) -> str:
    base = yaml.safe_load((ROOT / "tiny" / "sft.yaml").read_text())
    base.pop("gradient_checkpointing")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**base, **fields}))
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
    if path.graphs:
        assert path.graph_tokens >= 8192 and path.graph_doc_slots >= 64


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
