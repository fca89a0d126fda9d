"""Memory planner: the longest sequence one GPU can train, for a Falcon-H1 config, a method and a card.

    python -m model.memory --preset 0.5b --method full --card-gib 80 [--offload] [--seq 524288]

Model of the peak (bytes), training one packed row of T tokens with per-layer activation checkpointing:

    static   = parameters × bytes per parameter (weights, gradients, AdamW moments; LoRA: frozen bf16 weights)
               + a fixed workspace (loss chunk, allocator slack)
    saved    = T × layers × hidden × 2            (each layer's bf16 input, kept for the recompute; 0 offloaded)
    working  = T × WORKING_FACTOR × elements(layer) × 2   (one layer's recompute: forward activations and
               their gradients, at once)

`elements(layer)` counts the per-token activations of one layer from the config (projections, conv, scan output,
attention q/k/v/o, MLP). WORKING_FACTOR is fitted to one measurement — 0.5B full fine-tune, 262,144 tokens,
39.82 GiB peak on an H200 (bench/results/h200-0.5b-longest-2026-11-26.json) — and checked against the others
committed in docs/performance.md. Attention memory is linear in T (flash / varlen kernels).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

GIB = 2**30
WORKSPACE_GIB = 1.0
MARGIN = 0.10  # share of the card kept free: allocator fragmentation, cuBLAS/NCCL workspaces. Without it the plan
# said 0.5B at 524,288 tokens fits an H100 (74.8 of 79.2 GiB); it ran out of memory (2026-11-26)
WORKING_FACTOR = 1.13  # fitted, see the module docstring
BYTES_PER_PARAM = {"bf16": 8, "amp": 16}  # bf16 weights+grads+2 AdamW moments; fp32 master copy under autocast


def layer_elements(config) -> int:
    """Per-token activations of one decoder layer's forward (what its backward needs at once)."""
    d, inter = config.hidden_size, config.intermediate_size
    heads, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    d_ssm, conv_dim, in_proj = config.d_ssm, config.conv_dim, config.in_proj_dim
    norms_and_residuals = 8 * d
    mamba = in_proj + 3 * conv_dim + 2 * d_ssm
    attention = 4 * heads * hd + 4 * kv * hd
    mlp = 4 * inter
    return norms_and_residuals + mamba + attention + mlp


@dataclass
class Plan:
    static_gib: float
    saved_kib_per_token: float
    working_kib_per_token: float
    longest_tokens: int
    peak_gib_at_seq: float | None = None


def plan(config, method="full", card_gib=80.0, offload=False, precision="bf16", seq=None, lora_params=0) -> Plan:
    """method: "full" or "lora" (lora_params: the adapters' size; default ~0.5% of the model)."""
    n_params = _n_params(config)
    if method == "full":
        static = n_params * BYTES_PER_PARAM[precision]
    elif method == "lora":
        adapters = lora_params or int(0.005 * n_params)
        static = n_params * 2 + adapters * 16
    else:
        raise ValueError(f"method must be 'full' or 'lora', got {method!r}")
    static += WORKSPACE_GIB * GIB
    saved = 0 if offload else config.num_hidden_layers * config.hidden_size * 2
    working = WORKING_FACTOR * layer_elements(config) * 2
    per_token = saved + working
    longest = max(0, int((card_gib * (1 - MARGIN) * GIB - static) / per_token)) // 1024 * 1024
    peak = (static + seq * per_token) / GIB if seq else None
    return Plan(
        round(static / GIB, 2), round(saved / 1024, 1), round(working / 1024, 1), longest, peak and round(peak, 2)
    )


def _n_params(config) -> int:
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attention = d * hd * (heads + 2 * kv) + heads * hd * d
    mamba = d * config.in_proj_dim + config.conv_dim * (config.mamba_d_conv + 1) + config.d_ssm * (d + 1)
    mlp = 3 * d * config.intermediate_size
    embeddings = vocab * d * (1 if config.tie_word_embeddings else 2)
    return layers * (attention + mamba + mlp + 2 * d) + embeddings + d


def main(argv=None):
    from .presets import preset_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="0.5b")
    parser.add_argument("--method", choices=("full", "lora"), default="full")
    parser.add_argument("--card-gib", type=float, default=79.0, help="usable GPU memory (H100 80GB: ~79)")
    parser.add_argument("--offload", action="store_true", help="saved layer inputs in CPU memory")
    parser.add_argument("--precision", choices=tuple(BYTES_PER_PARAM), default="bf16")
    parser.add_argument("--seq", type=int, default=None, help="also predict the peak at this length")
    args = parser.parse_args(argv)
    result = plan(preset_config(args.preset), args.method, args.card_gib, args.offload, args.precision, args.seq)
    for key, value in asdict(result).items():
        print(f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
