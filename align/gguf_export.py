"""Falcon-H1 → GGUF for llama.cpp: the `gguf` package writes the file, llama.cpp's own quantiser makes the
quantised variants.

llama.cpp's Falcon-H1 graph (`falcon-h1` architecture) applies no µP multiplier at run time: every multiplier is
linear, so it is folded into the weight it follows or precedes (spec §3.7) and recorded, for the reader, under
`falcon-h1.mup.*`:

    token_embd      × embedding_multiplier            output (lm_head)  × lm_head_multiplier
    attn_q, attn_v  × attention_in_multiplier         attn_k            × attention_in · key_multiplier
    attn_output     × attention_out_multiplier        ssm_out           × ssm_out_multiplier
    ssm_in rows     × ssm_in_multiplier · ssm_multipliers[z | x | B | C | dt]
    ffn_gate        × mlp_multipliers[0]              ffn_down          × mlp_multipliers[1]

(key_multiplier commutes with RoPE, and dt's multiplier acts before `+ dt_bias`, so both fold exactly.)

Quantisation: `llama_cpp.llama_model_quantize`, the function behind llama.cpp's `llama-quantize`, from
llama-cpp-python's low-level API. It knows llama.cpp's per-tensor policy (the SSM conv, A, D and the norms stay
F32; K-quant mixes such as Q4_K_M raise attn_v/ffn_down and the output; rows whose width is not a multiple of a
type's block fall back to a type whose block fits) and its K-quants; `gguf.quants` implements the block formats in
numpy but none of that policy, and no K-quant encoder.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# The Llama-3 split regex: what llama.cpp's `falcon-h1` pre-tokenizer (and `llama-bpe`) applies before byte-level BPE
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

MULTIPLIER_FIELDS = (
    "embedding_multiplier",
    "lm_head_multiplier",
    "key_multiplier",
    "attention_in_multiplier",
    "attention_out_multiplier",
    "ssm_in_multiplier",
    "ssm_out_multiplier",
    "mlp_multipliers",
    "ssm_multipliers",
)

# GGUF file types this writer makes itself; the quantised ones come from llama.cpp (QUANTISED)
WRITTEN = {"F32": 0, "F16": 1, "BF16": 32}  # gguf.LlamaFileType values
QUANTISED = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}  # llama_ftype values (llama.h)


class GGUFExportError(ValueError):
    """A checkpoint or tokenizer this writer cannot express in GGUF; the message names the field or file."""


def multipliers(config) -> dict:
    """The config's µP multipliers, as plain floats / lists (what gets folded)."""
    return {k: (list(map(float, v)) if isinstance(v, (list, tuple)) else float(v)) for k, v in
            ((f, getattr(config, f)) for f in MULTIPLIER_FIELDS)}  # fmt: skip


def check_expressible(config) -> None:
    """llama.cpp's graph computes Falcon-H1 as released: no projection biases, gate before the grouped norm, no dt
    clamp. Anything else would load and silently compute something different, so it is refused here."""
    problems = []
    for field in ("attention_bias", "mlp_bias", "projectors_bias", "mamba_proj_bias"):
        if getattr(config, field, False):
            problems.append(f"{field}=true (llama.cpp's falcon-h1 graph has no such bias)")
    if config.mamba_rms_norm and config.mamba_norm_before_gate:
        problems.append("mamba_norm_before_gate=true (llama.cpp normalises after the gate)")
    limit = tuple(getattr(config, "time_step_limit", (0.0, float("inf"))) or (0.0, float("inf")))
    if limit != (0.0, float("inf")):
        problems.append(f"time_step_limit={list(limit)} (llama.cpp does not clamp dt)")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act={config.hidden_act!r}")
    if problems:
        raise GGUFExportError("config.json: cannot be written as GGUF: " + "; ".join(problems))


def fold_multipliers(state_dict: dict, config, mup: dict | None = None) -> dict:
    """HF-named tensors (fp32) with the µP multipliers folded in (module docstring). `mup` overrides the config's
    multipliers: the conversion tests drop one at a time to show the check catches it."""
    mup = mup or multipliers(config)
    gate, down = mup["mlp_multipliers"]
    attn_in = mup["attention_in_multiplier"]
    d, gn, h = config.d_ssm, config.mamba_n_groups * config.mamba_d_state, config.mamba_n_heads
    rows = torch.cat([torch.full((n,), float(m)) for n, m in zip((d, d, gn, gn, h), mup["ssm_multipliers"])])
    scale_by_suffix = {
        "self_attn.q_proj.weight": attn_in,
        "self_attn.k_proj.weight": attn_in * mup["key_multiplier"],
        "self_attn.v_proj.weight": attn_in,
        "self_attn.o_proj.weight": mup["attention_out_multiplier"],
        "mamba.out_proj.weight": mup["ssm_out_multiplier"],
        "feed_forward.gate_proj.weight": gate,
        "feed_forward.down_proj.weight": down,
    }
    out = {}
    for name, tensor in state_dict.items():
        t = tensor.detach().float().clone()
        if name == "model.embed_tokens.weight":
            t *= mup["embedding_multiplier"]
        elif name == "lm_head.weight":
            t *= mup["lm_head_multiplier"]
        elif name.endswith("mamba.in_proj.weight"):
            t *= mup["ssm_in_multiplier"] * rows[:, None]  # (in_proj_dim, d): one multiplier per output row
        else:
            for suffix, scale in scale_by_suffix.items():
                if name.endswith(suffix):
                    t *= scale
        out[name] = t
    if "lm_head.weight" not in out:  # tied: llama.cpp needs its own output tensor (its multiplier differs)
        out["lm_head.weight"] = state_dict["model.embed_tokens.weight"].float() * mup["lm_head_multiplier"]
    return out


def _layer_names(i: int, config) -> dict:
    """HF name → (GGUF name, numpy reshape or None) for layer i."""
    p, b = f"model.layers.{i}.", f"blk.{i}."
    h, g = config.mamba_n_heads, config.mamba_n_groups
    names = {
        "input_layernorm.weight": ("attn_norm.weight", None),
        "pre_ff_layernorm.weight": ("ffn_norm", None),  # llama.cpp's falcon-h1 loader asks for it without ".weight"
        "self_attn.q_proj.weight": ("attn_q.weight", None),
        "self_attn.k_proj.weight": ("attn_k.weight", None),
        "self_attn.v_proj.weight": ("attn_v.weight", None),
        "self_attn.o_proj.weight": ("attn_output.weight", None),
        "mamba.in_proj.weight": ("ssm_in.weight", None),
        "mamba.conv1d.weight": ("ssm_conv1d.weight", (config.conv_dim, config.mamba_d_conv)),  # (C, 1, K) → (C, K)
        "mamba.conv1d.bias": ("ssm_conv1d.bias", None),
        "mamba.dt_bias": ("ssm_dt.bias", None),
        "mamba.A_log": ("ssm_a", (h, 1)),  # stored as A = -exp(A_log), (H, 1) as llama.cpp's Mamba-2 expects
        "mamba.D": ("ssm_d", (h, 1)),
        "mamba.norm.weight": ("ssm_norm.weight", (g, config.d_ssm // g)),  # one row per group of the gated norm
        "mamba.out_proj.weight": ("ssm_out.weight", None),
        "feed_forward.gate_proj.weight": ("ffn_gate.weight", None),
        "feed_forward.up_proj.weight": ("ffn_up.weight", None),
        "feed_forward.down_proj.weight": ("ffn_down.weight", None),
    }
    return {p + k: (b + v, shape) for k, (v, shape) in names.items()}


def gguf_tensors(folded: dict, config) -> list[tuple[str, np.ndarray]]:
    """Folded HF tensors → [(GGUF name, fp32 array)]; every input tensor is used exactly once."""
    table = {
        "model.embed_tokens.weight": ("token_embd.weight", None),
        "model.final_layernorm.weight": ("output_norm.weight", None),
        "lm_head.weight": ("output.weight", None),
    }
    for i in range(config.num_hidden_layers):
        table.update(_layer_names(i, config))
    unknown = sorted(set(folded) - set(table))
    if unknown:
        raise GGUFExportError(f"model.safetensors: tensors with no GGUF name: {unknown}")
    out = []
    for name, (gguf_name, shape) in table.items():
        if name not in folded:
            if name.endswith(("mamba.norm.weight", "mamba.conv1d.bias")):
                continue  # optional in the graph too
            raise GGUFExportError(f"model.safetensors: {name} is missing")
        t = folded[name]
        if name.endswith("A_log"):
            t = -torch.exp(t)
        array = t.numpy().astype(np.float32)
        out.append((gguf_name, array.reshape(shape) if shape else array))
    return out


def _keeps_f32(name: str, array: np.ndarray) -> bool:
    # what llama.cpp's kernels expect in F32: 1-D tensors, norms, the SSM conv, A and D
    return array.ndim == 1 or "norm" in name or "ssm_conv1d" in name or name.endswith(("ssm_a", "ssm_d"))


# ----------------------------------------------------------------------------------------------- tokenizer
@dataclass
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int | None
    eos: int | None
    pad: int | None
    eot: int | None
    add_bos: bool
    chat_template: str | None


def pre_tokenizer_name(tokenizer_json: dict, where: str = "tokenizer.json") -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, read from its structure: byte-level BPE with GPT-2's
    regex → `gpt-2`; the Llama-3 split regex then byte-level without a regex → `falcon-h1` (llama.cpp applies the
    Llama-3 regex for it). llama.cpp's own converter recognises tokenizers by a hash of their output on a fixed text
    instead, so it refuses any tokenizer it has not seen — a project's own tokenizer included."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"{where}: model.type is {model.get('type')!r}; only byte-level BPE is written")
    if tokenizer_json.get("normalizer"):
        raise GGUFExportError(f"{where}: a normalizer ({tokenizer_json['normalizer'].get('type')}) has no GGUF form")

    def byte_level(p, use_regex):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) == use_regex and not p.get("add_prefix_space")

    if byte_level(pre, True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
        and byte_level(steps[1], False)
    ):
        return "falcon-h1"
    raise GGUFExportError(
        f"{where}: pre-tokenizer {json.dumps(pre)[:200]} is not one this writer can name for llama.cpp "
        "(byte-level GPT-2, or the Llama-3 split then byte-level); pass pre_tokenizer= with llama.cpp's name and "
        "check tokenisation (release_checks.tokenisation)"
    )


def serving_chat_template(template: str | None) -> str | None:
    """The training template without its `{% generation %}` markers (they only mark the loss; serving stacks'
    Jinja, llama.cpp's included, do not know the tag). Renders the same text."""
    if not template:
        return template
    return re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", template)


def vocab_from_tokenizer(tokenizer, vocab_size: int, pre_tokenizer: str | None = None) -> GGUFVocab:
    """A Hugging Face fast tokenizer → GGUF's `gpt2` vocabulary: tokens by id (padded to the model's rows), types
    (control for special tokens), merges, special ids, whether a BOS is prepended, the chat template."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = pre_tokenizer or pre_tokenizer_name(data)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise GGUFExportError(f"tokenizer has {len(by_id)} tokens but the model only {vocab_size} rows (vocab_size)")
    special = {t["content"] for t in data.get("added_tokens", []) if t.get("special")}
    added = {t["content"] for t in data.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        else:
            tokens.append(token)
            types.append(3 if token in special else 4 if token in added else 1)  # CONTROL, USER_DEFINED, NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    probe = tokenizer("a")["input_ids"]
    return GGUFVocab(
        tokens=tokens,
        types=types,
        merges=merges,
        pre=pre,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
        eot=im_end if im_end not in (None, tokenizer.unk_token_id) else None,
        add_bos=bool(probe) and probe[0] == tokenizer.bos_token_id,
        chat_template=serving_chat_template(tokenizer.chat_template),
    )


# ----------------------------------------------------------------------------------------------- writing
def write_gguf(model, tokenizer, path, file_type: str = "F16", name: str = "model", mup: dict | None = None,
               pre_tokenizer: str | None = None) -> Path:  # fmt: skip
    """Our FalconH1ForCausalLM (any dtype) + its tokenizer → one GGUF file of `file_type` (F32, F16 or BF16)."""
    import gguf

    if file_type not in WRITTEN:
        raise GGUFExportError(f"file_type {file_type!r}: written types are {sorted(WRITTEN)}; quantise with quantize()")
    config = model.config
    check_expressible(config)
    vocab = vocab_from_tokenizer(tokenizer, config.vocab_size, pre_tokenizer)
    tensors = gguf_tensors(fold_multipliers(model.state_dict(), config, mup), config)
    path = Path(path)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.FALCON_H1]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_file_type(WRITTEN[file_type])
    w.add_vocab_size(config.vocab_size)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_freq_base(config.rope_theta_value)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_ssm_conv_kernel(config.mamba_d_conv)
    w.add_ssm_inner_size(config.d_ssm)
    w.add_ssm_state_size(config.mamba_d_state)
    w.add_ssm_time_step_rank(config.mamba_n_heads)
    w.add_ssm_group_count(config.mamba_n_groups)
    for key, value in (mup or multipliers(config)).items():  # folded into the weights; recorded for readers
        key = f"{arch}.mup.{key}"
        w.add_array(key, value) if isinstance(value, list) else w.add_float32(key, value)
    w.add_bool(f"{arch}.mup.folded", True)
    _add_vocab(w, vocab)
    qtype = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
             "BF16": gguf.GGMLQuantizationType.BF16}[file_type]  # fmt: skip
    for gguf_name, array in tensors:
        if _keeps_f32(gguf_name, array) or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name, array)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gguf_name, array.astype(np.float16))
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_vocab(w, vocab: GGUFVocab) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    for value, add in ((vocab.bos, w.add_bos_token_id), (vocab.eos, w.add_eos_token_id),
                       (vocab.pad, w.add_pad_token_id), (vocab.eot, w.add_eot_token_id)):  # fmt: skip
        if value is not None:
            add(value)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(False)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


def quantize(source, target, file_type: str, threads: int | None = None) -> Path:
    """An F16/BF16/F32 GGUF → `file_type` (Q8_0, Q4_0, Q4_K_M) by llama.cpp's quantiser (module docstring)."""
    import llama_cpp

    if file_type not in QUANTISED:
        raise GGUFExportError(f"file_type {file_type!r}: llama.cpp quantisations offered are {sorted(QUANTISED)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTISED[file_type]
    params.nthread = threads or os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise GGUFExportError(f"{target}: llama.cpp's quantiser failed ({file_type}, status {status})")
    return Path(target)
