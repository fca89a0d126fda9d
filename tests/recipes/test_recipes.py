"""Every recipe under recipes/ parses through its script's parser; accelerate configs are valid YAML."""

from pathlib import Path

import pytest
import yaml

from align import dpo, grpo, sft
from align.args import lora_targets

ROOT = Path(__file__).resolve().parents[2] / "recipes"


def _stage(path: Path) -> str:
    """A recipe's script: DPO recipes live in a dpo/ folder or are named dpo*.yaml / *preference*.yaml; GRPO
    recipes likewise in grpo/ or grpo*.yaml."""
    if "grpo" in path.parts or path.stem.startswith("grpo"):
        return "grpo"
    if "dpo" in path.parts or path.stem.startswith("dpo") or "preference" in path.stem:
        return "dpo"
    return "sft"


RECIPES = sorted(p for p in ROOT.rglob("*.yaml") if "accelerate_configs" not in p.parts and p.stem != "pipeline")
SFT_RECIPES = [p for p in RECIPES if _stage(p) == "sft"]
DPO_RECIPES = [p for p in RECIPES if _stage(p) == "dpo"]
GRPO_RECIPES = [p for p in RECIPES if _stage(p) == "grpo"]
CPU = ["--use_cpu", "True", "--bf16", "False"]  # GPU recipes are validated here on a CPU machine


def test_there_are_recipes_for_each_size_and_method():
    names = {str(p.relative_to(ROOT)) for p in SFT_RECIPES}
    for size in ("0.5b", "1.5b-deep", "7b"):
        assert {f"falcon-h1-{size}/sft/full.yaml", f"falcon-h1-{size}/sft/lora.yaml"} <= names
    assert {"falcon-h1-7b/sft/qlora.yaml", "falcon-h1-34b/sft/qlora.yaml", "mixes/sft-multilingual-18.yaml"} <= names


@pytest.mark.parametrize("recipe", SFT_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_sft_recipe_parses(recipe):
    header = recipe.read_text().splitlines()[:8]
    assert any("Hardware" in line for line in header) and any("Command" in line for line in header), recipe
    align_args, sft_args, model_args = sft.parse(["--config", str(recipe), *CPU])
    assert sft_args.output_dir and model_args.model_name_or_path
    assert align_args.sources, "a recipe declares its data"
    if model_args.use_peft:
        lora_targets(model_args.lora_target_modules)  # refused targets would raise


def test_there_are_dpo_recipes_for_each_size_and_method():
    names = {str(p.relative_to(ROOT)) for p in DPO_RECIPES}
    for size in ("0.5b", "1.5b-deep", "7b"):
        assert {f"falcon-h1-{size}/dpo/full.yaml", f"falcon-h1-{size}/dpo/lora.yaml"} <= names
    assert {"tiny/dpo.yaml", "mixes/dpo-preference.yaml"} <= names


@pytest.mark.parametrize("recipe", DPO_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dpo_recipe_parses(recipe):
    from align.preference import resolve_loss_types

    header = recipe.read_text().splitlines()[:8]
    assert any("Hardware" in line for line in header) and any("Command" in line for line in header), recipe
    align_args, dpo_args, model_args = dpo.parse(["--config", str(recipe), *CPU])
    assert dpo_args.output_dir and model_args.model_name_or_path and align_args.sources
    resolve_loss_types(dpo_args.loss_type)  # unknown loss names would raise
    if model_args.use_peft:
        lora_targets(model_args.lora_target_modules)
    if recipe.relative_to(ROOT).parts[0].startswith("falcon-h1"):
        # TII's DPO: length-normalised, beta 5, LR 5e-6, 2 epochs with warmup 0.1; LoRA adapters start at zero: 10×
        assert resolve_loss_types(dpo_args.loss_type) == ["sigmoid_norm"] and dpo_args.beta == 5.0
        assert dpo_args.num_train_epochs == 2 and dpo_args.warmup_steps == 0.1
        assert dpo_args.learning_rate == (5e-5 if model_args.use_peft else 5e-6)


def test_there_are_grpo_recipes_for_each_size_and_method():
    names = {str(p.relative_to(ROOT)) for p in GRPO_RECIPES}
    for size in ("0.5b", "1.5b-deep", "7b"):
        assert {f"falcon-h1-{size}/grpo/full.yaml", f"falcon-h1-{size}/grpo/lora.yaml"} <= names
    assert "tiny/grpo.yaml" in names


@pytest.mark.parametrize("recipe", GRPO_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_grpo_recipe_parses(recipe):
    from align.rewards import resolve

    header = recipe.read_text().splitlines()[:8]
    assert any("Hardware" in line for line in header) and any("Command" in line for line in header), recipe
    align_args, grpo_args, model_args = grpo.parse(["--config", str(recipe), *CPU])
    assert grpo_args.output_dir and model_args.model_name_or_path and align_args.sources
    rewards = resolve(align_args.reward_funcs, grpo_args.max_completion_length, align_args.overlong_buffer)
    assert grpo_args.reward_weights is None or len(grpo_args.reward_weights) == len(rewards)
    if model_args.use_peft:
        lora_targets(model_args.lora_target_modules)
    if recipe.relative_to(ROOT).parts[0].startswith("falcon-h1"):
        # the header's global batch is whole groups: completions per step divide into num_generations
        per_step = grpo_args.per_device_train_batch_size * grpo_args.gradient_accumulation_steps
        assert per_step % grpo_args.num_generations == 0 and "exact_answer" in align_args.reward_funcs
        assert grpo_args.loss_type == "dapo" and grpo_args.epsilon_high == 0.28
        assert grpo_args.learning_rate == (1e-5 if model_args.use_peft else 1e-6)
        assert f"{per_step}" in " ".join(header) or "GPUs" in " ".join(header)


def test_unknown_recipe_key_is_an_error(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text((ROOT / "tiny" / "sft.yaml").read_text() + "learnin_rate: 1.0\n")
    with pytest.raises(ValueError, match="learnin_rate"):
        sft.parse(["--config", str(bad)])


@pytest.mark.parametrize("config", sorted((ROOT / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_are_valid(config):
    data = yaml.safe_load(config.read_text())
    assert data["distributed_type"] in {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"} and data["mixed_precision"] == "bf16"
    if data["distributed_type"] == "FSDP":
        assert data["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "FalconH1DecoderLayer"


def test_every_mixture_field_reaches_the_mixture():
    """The recipe-level mixture fields map one to one onto MixtureConfig (a field left out is silently ignored)."""
    from dataclasses import fields

    from align.data import MixtureConfig

    align_args, _, _ = sft.parse(["--config", str(ROOT / "mixes" / "sft-multilingual-18.yaml"), *CPU])
    mixture = align_args.mixture()
    assert mixture.other_languages_weight == 0.0 and mixture.language_weights["pol"] == 3.0
    renamed = {"seed": "mixture_seed"}
    assert mixture.kind == "sft" and align_args.mixture("preference").kind == "preference"  # set by the script
    assert align_args.mixture(max_length=512).max_length == 512  # the trainer's cut, set by the script too
    for f in fields(MixtureConfig):
        if f.name in ("kind", "max_length"):
            continue
        assert getattr(mixture, f.name) == getattr(align_args, renamed.get(f.name, f.name)), f.name
