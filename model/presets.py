"""Released Falcon-H1 shapes (spec §1) for from-scratch init and benchmarks.

The shapes are the released ones. The µP multipliers are verbatim for 0.5B (its config.json) and 7B (the
Falcon-H1R-7B config); the other sizes reuse the nearest known set. For real weights always load the
checkpoint's own config.json: these presets are for random-weight work (tests, benchmarks, pretraining).
"""

from __future__ import annotations

from .config import FalconH1Config

_MUP_0_5B = dict(
    embedding_multiplier=5.656854249492381,
    lm_head_multiplier=0.0390625,
    key_multiplier=0.39062499999999994,
    attention_in_multiplier=1.0,
    attention_out_multiplier=0.9375,
    ssm_in_multiplier=1.25,
    ssm_out_multiplier=0.23570226039551587,
    mlp_multipliers=[0.8838834764831844, 0.5859375],
    ssm_multipliers=[0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738],
)
_MUP_7B = dict(
    embedding_multiplier=5.65685,
    lm_head_multiplier=0.0130208,
    key_multiplier=0.0306904,
    attention_in_multiplier=1.0,
    attention_out_multiplier=0.104167,
    ssm_in_multiplier=0.416667,
    ssm_out_multiplier=0.117851,
    mlp_multipliers=[0.294628, 0.0325521],
    ssm_multipliers=[0.353553, 0.25, 0.176777, 0.5, 0.353553],
)
_COMMON = dict(
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=1e11,
    tie_word_embeddings=False,
    mamba_d_conv=4,
    mamba_conv_bias=True,
    mamba_proj_bias=False,
    mamba_norm_before_gate=False,
    bos_token_id=1,
    eos_token_id=11,
    pad_token_id=0,
)


def _shape(L, d, heads, kv, hd, d_ssm, mh, mp, G, N, chunk, inter, vocab, max_pos, rms_norm):
    return dict(
        num_hidden_layers=L,
        hidden_size=d,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hd,
        mamba_d_ssm=d_ssm,
        mamba_n_heads=mh,
        mamba_d_head=mp,
        mamba_n_groups=G,
        mamba_d_state=N,
        mamba_chunk_size=chunk,
        intermediate_size=inter,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        mamba_rms_norm=rms_norm,
    )


PRESETS: dict[str, dict] = {
    "0.5b": {**_shape(36, 1024, 8, 2, 64, 1536, 24, 64, 1, 128, 128, 2048, 32784, 16384, False), **_MUP_0_5B},
    "1.5b": {**_shape(24, 2048, 8, 2, 128, 3072, 48, 64, 1, 256, 128, 4608, 65537, 131072, True), **_MUP_0_5B},
    "1.5b-deep": {**_shape(66, 1280, 6, 2, 128, 1536, 24, 64, 1, 256, 128, 3072, 65537, 131072, True), **_MUP_0_5B},
    "3b": {**_shape(32, 2560, 10, 2, 128, 4096, 32, 128, 1, 256, 128, 6144, 65536, 131072, True), **_MUP_7B},
    "7b": {**_shape(44, 3072, 12, 2, 128, 3072, 24, 128, 1, 256, 128, 12288, 130048, 262144, True), **_MUP_7B},
    "34b": {**_shape(72, 5120, 20, 4, 128, 4096, 32, 128, 2, 256, 128, 21504, 261120, 262144, True), **_MUP_7B},
}


def preset_config(name: str, **overrides) -> FalconH1Config:
    """`preset_config("0.5b", num_hidden_layers=2)` → a FalconH1Config of that released shape."""
    key = name.lower().removeprefix("falcon-h1-")
    if key not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return FalconH1Config(**{**_COMMON, **PRESETS[key], **overrides})
