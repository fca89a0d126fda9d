"""Arguments of the alignment scripts: ours next to TRL's `SFTConfig` and `ModelConfig`.

A recipe YAML sets any field of the three; a command-line flag overrides the YAML; an unknown key in either
is an error, so a typo never passes silently. `RecipeParser` (over align/validate.py's) reads them and checks every
value, naming the recipe's file, line and field.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from .data import MixtureConfig, SourceConfig
from .validate import InputError, from_mapping, shown
from .validate import RecipeParser as ValidatingParser

# Mixer weights read raw by fused kernels (and by peft's checks): never LoRA targets. in_proj is safe and needed:
# without it LoRA trains almost nothing in the SSM.
SAFE_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "gate_proj", "up_proj", "down_proj"]
REFUSED_LORA_TARGETS = {
    "out_proj": "Mamba out_proj is consumed raw by the fused split-conv-scan kernel: an adapter there never trains "
    "and merging crashes (peft#2556).",
    "conv1d": "the depthwise conv1d weight is read raw by the conv kernels and has shape (C, 1, K): LoRA cannot "
    "adapt it meaningfully and merging crashes.",
}


@dataclass
class AlignArguments:
    """falcon-align's own arguments (model, data mixture, outputs)."""

    init_preset: str | None = field(
        default=None,
        metadata={
            "help": "Start from randomly initialised weights of a released shape (0.5b, 1.5b-deep, 7b, ...) instead "
            "of model_name_or_path's weights; model_name_or_path then only supplies the tokenizer."
        },
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to model_name_or_path."})
    chat_template: str = field(
        default="auto",
        metadata={
            "help": "'auto': keep the tokenizer's template if it has {% generation %} markers, else use falcon-align's "
            "Falcon-H1 template; 'falcon_h1': always ours; 'tokenizer': always the tokenizer's."
        },
    )
    sources: list[SourceConfig] = field(default_factory=list, metadata={"help": "Training data sources."})
    language_weights: dict[str, float] | None = field(default=None, metadata={"help": "Per-language multipliers."})
    other_languages_weight: float = field(default=1.0, metadata={"help": "Multiplier for unlisted languages."})
    mixture_seed: int = 42
    dedup: bool = True
    min_chars: int = 1
    max_chars: int | None = None
    max_malformed_fraction: float = 0.01
    eval_fraction: float = field(default=0.0, metadata={"help": "Held-out share of each source for evaluation."})
    merge_lora: bool = field(default=False, metadata={"help": "Also save the LoRA adapters merged into the model."})
    context_parallel_size: int = field(
        default=1,
        metadata={
            "help": "Split every packed row over groups of this many processes (exact for attention, conv and SSM; "
            "align/long_context.py); the groups are data-parallel. Needs packing; must divide the process count."
        },
    )
    activation_offload: bool = field(
        default=False,
        metadata={
            "help": "Long context on one GPU: each layer's saved input goes to pinned CPU memory (needs "
            "gradient_checkpointing with use_reentrant: true) and rows over 16,384 tokens run the MLP in "
            "checkpointed chunks; see `python -m model.memory` for the longest length."
        },
    )
    compile_layers: bool | None = field(
        default=None,
        metadata={
            "help": "torch.compile every decoder layer (regional; FalconH1ForCausalLM.compile_layers): inductor fuses "
            "norms, RoPE, µP multipliers, gates and the conv around the scan, attention and GEMM kernels. Default: on "
            "CUDA. Padding-free batches vary in length: layers compile twice (the second time with a symbolic length)."
        },
    )
    training_graphs: bool | None = field(
        default=None,
        metadata={
            "help": "Capture every layer's forward and backward in CUDA graphs for padding-free rows of up to "
            "graph_tokens tokens (align/fast_path.py). Default: on CUDA for one process with padding-free rows, unless "
            "activation checkpointing is needed. Micro-batches that do not fit run eagerly, counted in the logs."
        },
    )
    graph_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Token budget of the captured row. Default: per_device_train_batch_size × max_length; DPO: what "
            "the per_device_train_batch_size longest pairs of the training set hold."
        },
    )
    graph_budgets: int | None = field(
        default=None,
        metadata={
            "help": "How many token budgets are captured, up to graph_tokens; each micro-batch replays the smallest "
            "that holds it (every captured token is computed). Default: DPO 4, chosen where micro-batches of the "
            "training pairs land (least filler), as many as the memory planner's headroom holds; else 1. Each budget "
            "keeps its own trainable gradients and every layer's input and output at its size."
        },
    )
    graph_doc_slots: int | None = field(
        default=None,
        metadata={
            "help": "Documents a captured row holds. Default: what a micro-batch needs (DPO: 2 × "
            "per_device_train_batch_size; packed rows: the most documents a packed row of the training set holds × "
            "per_device_train_batch_size; else per_device_train_batch_size), plus the filler documents. Each slot "
            "costs the varlen attention kernel a launch over max_length tokens, used or not."
        },
    )
    runtime: dict | None = field(  # a mapping in YAML; JSON on the command line (RecipeParser reads it)
        default=None,
        metadata={
            "help": "Run-time choices of the fast path (model.settings): kernels (auto|triton|mamba-ssm|reference), "
            "fused_projections, mixer_streams, ssd_recompute, compile_backend, compile_loss. A mapping in the "
            "recipe; JSON on the command line."
        },
    )
    report_dir: str | None = field(default=None, metadata={"help": "Where mixture reports go; default output_dir."})

    def __post_init__(self):
        sources = _source_dicts(self.sources)
        self.sources = [from_mapping(SourceConfig, s, f"sources[{i}]") for i, s in enumerate(sources)]

    def mixture(self, kind: str = "sft", max_length: int | None = None) -> MixtureConfig:
        """The data mixture; `max_length`: where the trainer cuts rows (their start kept), so that rows left without
        an answer are dropped and counted."""
        return MixtureConfig(
            sources=self.sources,
            kind=kind,
            language_weights=self.language_weights,
            other_languages_weight=self.other_languages_weight,
            seed=self.mixture_seed,
            dedup=self.dedup,
            min_chars=self.min_chars,
            max_chars=self.max_chars,
            max_malformed_fraction=self.max_malformed_fraction,
            eval_fraction=self.eval_fraction,
            max_length=max_length,
        )


class RecipeParser(ValidatingParser):
    """The recipe parser (align/validate.py: errors name file, line and field) that also takes
    `gradient_checkpointing: auto` in a recipe or on the command line, and makes it the default where neither sets
    it: the stage then decides from the memory planner (align/fast_path.py). Every parsed AlignArguments carries the
    outcome as `auto_checkpointing`."""

    def parse_args_and_config(self, args=None, **kwargs):
        args = list(sys.argv[1:] if args is None else args)
        self._cli, self._recipe = _pop_flag(args, "--gradient_checkpointing"), None
        runtime = _pop_json(args, "--runtime")
        parsed = super().parse_args_and_config(args=args, **kwargs)
        setting = self._cli if self._cli is not None else self._recipe
        for obj in parsed:
            if isinstance(obj, AlignArguments):
                obj.auto_checkpointing = setting in (None, "auto")
                obj.runtime = runtime if runtime is not None else obj.runtime
        return parsed

    def set_defaults_with_config(self, **kwargs):
        if "gradient_checkpointing" in kwargs:
            self._recipe = kwargs["gradient_checkpointing"]
            if self._recipe == "auto":
                kwargs.pop("gradient_checkpointing")
        return super().set_defaults_with_config(**kwargs)


def _pop_json(args: list, flag: str) -> dict | None:
    """`flag '{...}'` → removed from args, the JSON object; absent → None."""
    if flag not in args:
        return None
    at = args.index(flag)
    raw = args[at + 1] if at + 1 < len(args) else ""
    del args[at : at + 2]
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag}: expected a JSON object, got {raw!r} ({err.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag}: expected a JSON object, got {raw!r}")
    return value


def _pop_flag(args: list, flag: str):
    """`flag auto` / `flag=auto` → removed from args, "auto"; another value → left, the value; absent → None."""
    for i, arg in enumerate(args):
        if arg == flag or arg.startswith(flag + "="):
            value = arg.split("=", 1)[1] if "=" in arg else args[i + 1] if i + 1 < len(args) else "true"
            value = "true" if value.startswith("--") else value
            if value == "auto":
                del args[i : i + (1 if "=" in arg else 2)]
            return value
    return None


@dataclass
class PreferenceArguments(AlignArguments):
    """AlignArguments plus what DPO adds: where reference log-probs are cached, and the reference model."""

    ref_logps_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "With precompute_ref_log_probs: keep the reference log-probs here, keyed by everything that "
            "changes them, and reuse them across runs (default: output_dir/ref_logps)."
        },
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Full fine-tuning only: the reference model (default: the starting model). LoRA always uses "
            "the starting model with its adapters disabled, with no second copy in memory."
        },
    )


def _source_dicts(sources):
    """YAML gives dicts; the command line gives JSON strings (`--sources '[{"path": "a.jsonl"}]'`)."""
    if not isinstance(sources, list):  # YAML text reaches here as a SourceConfig argparse built from it
        raise InputError(f"expected a list of sources, got {shown(getattr(sources, 'path', sources))}", "sources")
    out = []
    for s in sources:
        if isinstance(s, SourceConfig) and s.path.lstrip().startswith(("[", "{")):
            s = s.path  # argparse built a SourceConfig from the raw command-line string
        if isinstance(s, str):
            try:
                s = json.loads(s)
            except json.JSONDecodeError as err:
                raise InputError(f"expected JSON (a source object or a list of them), got {s!r}", "sources") from err
        out.extend(s if isinstance(s, list) else [s])
    return out


def lora_targets(requested) -> list[str]:
    """The LoRA target list: safe defaults, or the request minus nothing — refused targets raise."""
    if requested in (None, [], "default"):
        return list(SAFE_LORA_TARGETS)
    if isinstance(requested, str):
        requested = [t.strip() for t in requested.split(",")] if requested != "all-linear" else ["all-linear"]
    if "all-linear" in requested:
        raise ValueError(
            "lora_target_modules='all-linear' would include Mamba's out_proj; list the targets "
            f"explicitly, e.g. {SAFE_LORA_TARGETS}"
        )
    for target in requested:
        for refused, why in REFUSED_LORA_TARGETS.items():
            if target == refused or target.endswith("." + refused):
                raise ValueError(f"LoRA target {target!r} refused: {why} Safe targets: {SAFE_LORA_TARGETS}")
    return list(requested)


@dataclass
class GRPOArguments(AlignArguments):
    """AlignArguments plus what GRPO adds: the rewards, and the reference for full fine-tuning."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["exact_answer"],
        metadata={
            "help": "Rewards by name (align/rewards.py: exact_answer, answer_format, language_consistency, "
            "length_penalty) or import path 'package.module:function'; reward_weights weighs them."
        },
    )
    overlong_buffer: int = field(
        default=256,
        metadata={"help": "length_penalty: tokens before max_completion_length where the penalty starts (DAPO)."},
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Full fine-tuning with beta > 0 only: the KL reference (default: the starting model). LoRA uses "
            "the starting model with its adapters disabled, with no second copy in memory."
        },
    )
