"""Shared fixtures: tiny Falcon-H1 configs and HF twins carrying the same weights."""

from __future__ import annotations

import socket
import statistics

import pytest
import torch

from model import FalconH1Config, FalconH1ForCausalLM

# every one of the nine µP multipliers ≠ 1
MULTIPLIERS = dict(
    embedding_multiplier=2.5,
    lm_head_multiplier=0.3,
    key_multiplier=0.7,
    attention_in_multiplier=1.3,
    attention_out_multiplier=0.8,
    ssm_in_multiplier=1.25,
    ssm_out_multiplier=0.6,
    mlp_multipliers=[0.9, 0.55],
    ssm_multipliers=[0.35, 0.25, 0.4, 0.5, 0.3],
)


def tiny_kwargs(**overrides) -> dict:
    kw = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        mamba_d_ssm=64,
        mamba_n_heads=8,
        mamba_d_head="auto",
        mamba_n_groups=1,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_chunk_size=8,
        mamba_rms_norm=True,
        mamba_norm_before_gate=False,
        rope_theta=1e11,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        pad_token_id=0,
        **MULTIPLIERS,
    )
    kw.update(overrides)
    return kw


def tiny_config_for(tokenizer, **overrides) -> FalconH1Config:
    """A 2-layer, 32-wide Falcon-H1 sized to a tokenizer (alignment and demo tests)."""
    kw = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        mamba_d_ssm=64,
        mamba_n_heads=4,
        mamba_d_state=8,
        mamba_chunk_size=16,
        rope_theta=1e11,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    kw.update(overrides)
    return FalconH1Config(**kw)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere (norm weights, D, dt_bias too), so no parameter hides behind an init of 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
            elif name.endswith(("norm.weight", "layernorm.weight")) or name.endswith(".D"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def tiny_model(seed: int = 0, dtype=torch.float32, **overrides) -> FalconH1ForCausalLM:
    torch.manual_seed(seed)
    model = FalconH1ForCausalLM(FalconH1Config(**tiny_kwargs(**overrides)))
    return randomize_(model, seed).to(dtype).eval()


def hf_twin(ours: FalconH1ForCausalLM):
    """transformers' own FalconH1ForCausalLM with exactly our weights (strict)."""
    from transformers import FalconH1Config as HFConfig
    from transformers import FalconH1ForCausalLM as HFModel

    cfg = HFConfig(
        **{
            k: v
            for k, v in ours.config.to_dict().items()
            if k not in ("architectures", "transformers_version", "model_type")
        }
    )
    cfg._attn_implementation = "eager"
    hf = HFModel(cfg).to(next(ours.parameters()).dtype)
    hf.load_state_dict(ours.state_dict(), strict=True)
    return hf.eval()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous or a server the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def assert_as_accurate(got, base, truth, factor: float = 2.0):
    """Two bf16 computations of one model differ by their rounding as much as either differs from fp32: in the tiny
    models 3–4% of the largest logit and 5–8% of the largest entry of some gradient (A_log, dt_bias, the conv),
    measured on CPU; so comparing them directly at a bf16 tolerance is noise. Each of got, base, truth is
    (logits or loss, {name: gradient}); `got` (a fast or compiled path) is held to the accuracy that `base` (the
    path it replaces) reaches against the fp32 `truth` on the same weights, the output and every gradient on its own:
    error ≤ factor · base's error + base's median gradient error (one parameter's error varies by chance: over eight
    seeds on CPU the fused projections needed at most 0.35 of that median beyond twice the unfused error). A wrong
    gradient is off by O(1)."""
    (out_g, grads_g), (out_b, grads_b), (out_t, grads_t) = got, base, truth
    errors = {name: (rel_err(grads_g[name], g), rel_err(grads_b[name], g)) for name, g in grads_t.items()}
    floor = statistics.median(e[1] for e in errors.values()) if errors else 1e-3
    out_err = rel_err(out_g, out_t), rel_err(out_b, out_t)
    assert out_err[0] <= factor * out_err[1] + 1e-3, ("output", out_err)
    for name, (err_got, err_base) in errors.items():
        assert err_got <= factor * err_base + floor, (name, err_got, err_base, floor)


@pytest.fixture
def tiny():
    return tiny_model()
