"""Checkpoints: transformers ⇄ ours, strict keys and shapes, safetensors only, readable config errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import ConfigError, FalconH1Config, FalconH1ForCausalLM, preset_config
from model.presets import PRESETS
from tests.conftest import hf_twin, rel_err, tiny_kwargs, tiny_model

IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_checkpoint_loads_into_ours(tmp_path, tied):
    hf = hf_twin(tiny_model(seed=1, tie_word_embeddings=tied))
    hf.save_pretrained(tmp_path)
    ours = FalconH1ForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert rel_err(ours(IDS).logits, hf(IDS).logits) < 1e-6


@pytest.mark.parametrize("tied", [False, True])
def test_our_checkpoint_loads_into_vanilla_transformers(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    ours = tiny_model(seed=2, tie_word_embeddings=tied, mamba_n_groups=2)
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "falcon_h1" and cfg["architectures"] == ["FalconH1ForCausalLM"]
    assert cfg["rope_theta"] == 1e11 and cfg["head_dim"] == 16
    vanilla, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(vanilla).__module__.startswith("transformers.")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert rel_err(vanilla.eval()(IDS).logits, ours(IDS).logits) < 1e-6
    assert list((tmp_path).glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))


def test_round_trip_keeps_mup_buffers(tmp_path):
    ours = tiny_model(seed=3)
    ours.save_pretrained(tmp_path)
    again = FalconH1ForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again.model.layers[0].mamba.mup_vector, ours.model.layers[0].mamba.mup_vector)
    with torch.no_grad():
        assert rel_err(again(IDS).logits, ours(IDS).logits) < 1e-7


def _tamper(tmp_path, fn):
    tiny_model(seed=4).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_key_is_named(tmp_path):
    _tamper(tmp_path, lambda t: t.pop("model.layers.1.mamba.A_log"))
    with pytest.raises(ValueError, match=r"missing keys.*model\.layers\.1\.mamba\.A_log"):
        FalconH1ForCausalLM.from_pretrained(tmp_path)


def test_unexpected_key_is_named(tmp_path):
    _tamper(tmp_path, lambda t: t.update({"model.layers.0.mamba.extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected keys.*mamba\.extra\.weight"):
        FalconH1ForCausalLM.from_pretrained(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    _tamper(tmp_path, lambda t: t.update({"model.layers.0.mamba.D": torch.zeros(5)}))
    with pytest.raises(Exception, match=r"model\.layers\.0\.mamba\.D"):
        FalconH1ForCausalLM.from_pretrained(tmp_path)


def test_pickle_checkpoint_is_refused_unless_opted_in(tmp_path):
    ours = tiny_model(seed=5)
    ours.config.save_pretrained(tmp_path)
    torch.save(ours.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        FalconH1ForCausalLM.from_pretrained(tmp_path)
    loaded = FalconH1ForCausalLM.from_pretrained(tmp_path, allow_pickle=True).eval()
    with torch.no_grad():
        assert rel_err(loaded(IDS).logits, ours(IDS).logits) < 1e-7


@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(mamba_n_heads=5), "mamba_n_heads"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(mamba_d_head=7), "mamba_d_head"),
        (dict(mamba_n_groups=3), "mamba_n_groups"),
        (dict(head_dim=15), "head_dim"),
        (dict(ssm_multipliers=[1.0, 1.0]), "ssm_multipliers"),
    ],
)
def test_inconsistent_config_names_the_field(bad, field):
    with pytest.raises(ConfigError, match=rf"FalconH1Config\.{field}"):
        FalconH1Config(**tiny_kwargs(**bad))


def test_released_config_variants_parse():
    """rope_theta or rope_parameters, explicit head_dim, mamba_d_head="auto", extra keys HF ignores."""
    released = dict(
        tiny_kwargs(),
        attn_layer_indices=None,
        mamba_use_mlp=True,
        mlp_expansion_factor=8,
        time_step_min=0.001,
        time_step_max=0.1,
    )
    a = FalconH1Config(**released)
    b = FalconH1Config(
        **{k: v for k, v in released.items() if k != "rope_theta"},
        rope_parameters={"rope_type": "default", "rope_theta": 1e11},
    )
    assert a.rope_theta_value == b.rope_theta_value == 1e11
    assert a.mamba_d_head == 8 and a.head_dim == 16


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_have_the_released_parameter_counts(name):
    expected = {"0.5b": 0.52e9, "1.5b": 1.55e9, "1.5b-deep": 1.55e9, "3b": 3.15e9, "7b": 7.6e9, "34b": 33.6e9}[name]
    with torch.device("meta"):
        model = FalconH1ForCausalLM(preset_config(name))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - expected) / expected < 0.03, n
