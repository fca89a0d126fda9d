"""Memory planner: the longest sequence one GPU can train, for a Falcon-H1 config, a method and a card.

    python -m model.memory --preset 0.5b --method full --card-gib 80 [--offload] [--seq 524288]
    python -m model.memory --preset 7b --method lora --offload --context-parallel 2   # the row over 2 GPUs

Model of the peak (bytes), training one packed row of T tokens with per-layer activation checkpointing:

    static   = parameters × bytes per parameter (weights, gradients, AdamW moments; LoRA: frozen bf16 weights)
               + a fixed workspace (loss chunk, allocator slack)
    saved    = T × layers × hidden × 2            (each layer's bf16 input, kept for the recompute; 0 offloaded)
    working  = T × WORKING_FACTOR[method] × elements(layer) × 2   (one layer's recompute: forward activations
               and their gradients, at once)
               + chunk × WORKING_FACTOR[method] × 4·intermediate × 2  (offload mode runs the MLP in checkpointed
               chunks of MLP_CHUNK_TOKENS: then its 4·intermediate per token leave elements(layer), one chunk's stay)
    scan     = min(T, SCAN_SEGMENT_TOKENS) × SCAN_COPIES × H·P·N / chunk_size × 4   (the SSD scan's fp32 per-chunk
               states in its backward; longer rows scan in segments, so this stops growing)

`elements(layer)` counts the per-token activations of one layer from the config (projections, conv, scan output,
attention q/k/v/o, MLP). WORKING_FACTOR is fitted per method to H100 measurements (docs/performance.md,
bench/results/h100-*-long-*.json): full fine-tune to the 0.5B at 524,288 tokens with offload (38.47 GiB); LoRA to
the 7B's growth from 131,072 to 262,144 tokens with offload (40.99 → 64.69 GiB). LoRA's factor is larger: PEFT
materialises the frozen projection's output, the adapter's and their sum for every adapted projection. Every
other committed measurement is predicted at or above what was measured (tests/model/test_memory.py).
Attention memory is linear in T (flash / varlen kernels).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from .modeling import MLP_CHUNK_TOKENS, SCAN_SEGMENT_TOKENS

GIB = 2**30
WORKSPACE_GIB = 1.0
MARGIN = 0.10  # share of the card kept free: allocator fragmentation, cuBLAS/NCCL workspaces. Without it the plan
# said 0.5B at 524,288 tokens fits an H100 (74.8 of 79.2 GiB); it ran out of memory (2026-11-26)
WORKING_FACTOR = {"full": 0.89, "lora": 1.58}  # fitted, see the module docstring
# without checkpointing: per-token activations kept per layer, fitted to compiled + graphed bf16 full fine-tunes at
# 8,192 tokens (H100 0.5B 14.49 GiB, H200 1.5B-Deep 37.07 GiB; predicted 14.85, 38.24); LoRA scaled as WORKING_FACTOR
KEPT_FACTOR = {"full": 0.49, "lora": 0.49 * 1.58 / 0.89}
SCAN_COPIES = 4  # chunk states, passed states, their gradients: live at once in mamba-ssm's scan backward
BYTES_PER_PARAM = {"bf16": 8, "amp": 16}  # bf16 weights+grads+2 AdamW moments; fp32 master copy under autocast


def layer_elements(config, mlp_chunked: bool = False) -> int:
    """Per-token activations of one decoder layer's forward (what its backward needs at once). With the MLP in
    checkpointed chunks, only its output (and the concatenation) scale with the row."""
    d, inter = config.hidden_size, config.intermediate_size
    heads, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    d_ssm, conv_dim, in_proj = config.d_ssm, config.conv_dim, config.in_proj_dim
    norms_and_residuals = 8 * d
    mamba = in_proj + 3 * conv_dim + 2 * d_ssm
    attention = 4 * heads * hd + 4 * kv * hd
    mlp = 2 * d if mlp_chunked else 4 * inter
    return norms_and_residuals + mamba + attention + mlp


@dataclass
class Plan:
    static_gib: float
    saved_kib_per_token: float
    working_kib_per_token: float
    longest_tokens: int
    peak_gib_at_seq: float | None = None


def plan(
    config,
    method="full",
    card_gib=80.0,
    offload=False,
    precision="bf16",
    seq=None,
    lora_params=0,
    scan_segment=SCAN_SEGMENT_TOKENS,
    context_parallel=1,
    checkpointing=True,
) -> Plan:
    """method: "full" or "lora" (lora_params: the adapters' size; default ~0.5% of the model). offload: the layer
    inputs in CPU memory and the MLP in chunks (FalconH1ForCausalLM.enable_activation_offload). scan_segment: None
    for the one-piece scan (the model before 2026-11-27, as the committed measurements ran). context_parallel: the
    row split over this many GPUs (model/context_parallel.py): each holds T/W tokens' activations, and one layer's
    keys and values all-gathered over the whole row with their gradients (the 7B at 524,288 tokens on two H100s
    peaked at 64.68 GiB per GPU, as one H100 at 262,144: 64.69). checkpointing=False: every layer's activations and
    scan states are kept for the backward, not one layer's recompute. Sequence figures are the whole row's."""
    _check_positive(context_parallel=context_parallel, card_gib=card_gib, seq=seq, scan_segment=scan_segment)
    n_params = _n_params(config)
    if method == "full":
        static = n_params * BYTES_PER_PARAM[precision]
    elif method == "lora":
        adapters = lora_params or int(0.005 * n_params)
        static = n_params * 2 + adapters * 16
    else:
        raise ValueError(f"method must be 'full' or 'lora', got {method!r}")
    static += WORKSPACE_GIB * GIB
    if offload:  # one MLP chunk's recompute, whatever the row's length
        static += WORKING_FACTOR[method] * MLP_CHUNK_TOKENS * 4 * config.intermediate_size * 2
    saved = 0 if offload else config.num_hidden_layers * config.hidden_size * 2
    working = WORKING_FACTOR[method] * layer_elements(config, mlp_chunked=offload) * 2
    scan = SCAN_COPIES * config.mamba_n_heads * config.mamba_d_head * config.mamba_d_state / config.mamba_chunk_size * 4
    if not checkpointing:  # every layer's saved activations at once, each with one copy of its scan states
        layers = config.num_hidden_layers
        saved, scan_segment = 0, None
        working = KEPT_FACTOR[method] * layers * layer_elements(config) * 2
        scan = layers * scan / SCAN_COPIES
    if scan_segment:  # the scan's states stop growing at one segment
        static += scan_segment * scan
        scan = 0
    # per token of the whole row: this GPU's share, and the gathered bf16 keys and values with their gradients
    gathered = 4 * config.num_key_value_heads * config.head_dim * 2 if context_parallel > 1 else 0
    per_token = (saved + working + scan) / context_parallel + gathered
    longest = max(0, int((card_gib * (1 - MARGIN) * GIB - static) / per_token)) // 1024 * 1024
    peak = (static + seq * per_token) / GIB if seq else None
    per_layer = round((working + scan) / 1024, 1)
    return Plan(round(static / GIB, 2), round(saved / 1024, 1), per_layer, longest, peak and round(peak, 2))


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def _positive(kind):
    """argparse type: a number > 0, refused by the flag's name otherwise."""

    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


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
    parser.add_argument("--card-gib", type=_positive(float), default=79.0, help="usable GPU memory (H100 80GB: ~79)")
    parser.add_argument("--offload", action="store_true", help="saved layer inputs in CPU memory")
    parser.add_argument("--precision", choices=tuple(BYTES_PER_PARAM), default="bf16")
    parser.add_argument("--seq", type=_positive(int), default=None, help="also predict the peak at this length")
    parser.add_argument("--context-parallel", type=_positive(int), default=1, help="the row split over this many GPUs")
    args = parser.parse_args(argv)
    cfg = preset_config(args.preset)
    result = plan(cfg, args.method, args.card_gib, args.offload, args.precision, args.seq,
                  context_parallel=args.context_parallel)  # fmt: skip
    for key, value in asdict(result).items():
        print(f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
