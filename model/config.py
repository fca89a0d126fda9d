"""Falcon-H1 configuration: transformers' own `FalconH1Config` fields, plus validation that names the field.

We subclass transformers' class rather than re-declaring its fields so that every released `config.json`
(with `rope_theta` or `rope_parameters`, explicit `head_dim`, `mamba_d_head="auto"`, extra ignored keys)
parses exactly as vanilla transformers parses it, and so that `model_type == "falcon_h1"` holds for PEFT,
TRL, vLLM and lm-eval. What we add: dimension checks with readable errors, derived sizes used by the
model, and a `rope_theta` mirror on save so pre-v5 loaders read the checkpoint too.
"""

from __future__ import annotations

from transformers import FalconH1Config as _HFFalconH1Config


class ConfigError(ValueError):
    """A Falcon-H1 config whose dimensions do not fit together; the message names the field."""


class FalconH1Config(_HFFalconH1Config):
    def __post_init__(self, **kwargs):
        # Released configs always carry head_dim; older/handmade ones may not (then hidden/heads, as HF does).
        head_dim = kwargs.pop("head_dim", None)
        super().__post_init__(**kwargs)
        if head_dim is None:
            head_dim = getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads
        self.head_dim = int(head_dim)
        self.validate_dims()

    # ------------------------------------------------------------------ derived sizes
    @property
    def d_ssm(self) -> int:
        return self.mamba_d_ssm if self.mamba_d_ssm is not None else int(self.mamba_expand * self.hidden_size)

    @property
    def conv_dim(self) -> int:
        # channels of the depthwise conv: [x | B | C]
        return self.d_ssm + 2 * self.mamba_n_groups * self.mamba_d_state

    @property
    def in_proj_dim(self) -> int:
        # in_proj output layout: [z (d_ssm) | x (d_ssm) | B (G·N) | C (G·N) | dt (H)]
        return self.d_ssm + self.conv_dim + self.mamba_n_heads

    @property
    def rope_theta_value(self) -> float:
        params = self.rope_parameters or {}
        return float(params.get("rope_theta", getattr(self, "rope_theta", 10000.0)))

    # ------------------------------------------------------------------ validation
    def validate_dims(self) -> None:
        def need(cond: bool, field: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"FalconH1Config.{field}: {msg}")

        for field in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
            "mamba_n_heads",
            "mamba_n_groups",
            "mamba_d_state",
            "mamba_d_conv",
            "mamba_chunk_size",
            "head_dim",
        ):
            value = getattr(self, field)
            need(isinstance(value, int) and value > 0, field, f"must be a positive integer, got {value!r}")
        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"{self.num_key_value_heads} must divide num_attention_heads={self.num_attention_heads} (GQA)",
        )
        need(self.head_dim % 2 == 0, "head_dim", f"RoPE needs an even head_dim, got {self.head_dim}")
        need(
            self.d_ssm % self.mamba_n_heads == 0,
            "mamba_n_heads",
            f"{self.mamba_n_heads} must divide mamba_d_ssm={self.d_ssm}",
        )
        need(
            isinstance(self.mamba_d_head, int) and self.mamba_d_head * self.mamba_n_heads == self.d_ssm,
            "mamba_d_head",
            f"mamba_d_head={self.mamba_d_head!r} × mamba_n_heads={self.mamba_n_heads} "
            f"must equal mamba_d_ssm={self.d_ssm}",
        )
        need(
            self.mamba_n_heads % self.mamba_n_groups == 0,
            "mamba_n_groups",
            f"{self.mamba_n_groups} must divide mamba_n_heads={self.mamba_n_heads}",
        )
        need(
            self.d_ssm % self.mamba_n_groups == 0,
            "mamba_n_groups",
            f"{self.mamba_n_groups} must divide mamba_d_ssm={self.d_ssm} (group-wise gated norm)",
        )
        need(len(self.mlp_multipliers) == 2, "mlp_multipliers", f"needs [gate, down], got {self.mlp_multipliers!r}")
        need(len(self.ssm_multipliers) == 5, "ssm_multipliers", f"needs [z, x, B, C, dt], got {self.ssm_multipliers!r}")
        need(self.hidden_act == "silu", "hidden_act", f"Falcon-H1 uses 'silu', got {self.hidden_act!r}")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        need(
            rope_type == "default",
            "rope_parameters",
            f"only rope_type 'default' is supported (Falcon-H1 uses θ=1e11 unscaled), got {rope_type!r}",
        )

    def to_dict(self):
        out = super().to_dict()
        # Mirror θ at the top level: transformers < 5 and some serving stacks read only `rope_theta`.
        out["rope_theta"] = self.rope_theta_value
        out["head_dim"] = self.head_dim
        return out
