"""Model, tokenizer, PEFT, checkpoint and merge set-up shared by the alignment stages."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from model import FalconH1ForCausalLM, preset_config
from model.modeling import MLP_CHUNK_TOKENS, configure_backbones
from model.settings import configure

from .args import AlignArguments, lora_targets
from .templates import falcon_h1_chat_template

logger = logging.getLogger("falcon_align")


def _dtype(name):
    if name in (None, "auto"):
        return None
    return getattr(torch, name) if isinstance(name, str) else name


def load_tokenizer(model_args, align_args: AlignArguments, trust_remote_code: bool = False):
    name = align_args.tokenizer_name_or_path or model_args.model_name_or_path
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    has_markers = bool(tok.chat_template) and "{% generation %}" in tok.chat_template
    if align_args.chat_template == "falcon_h1" or (align_args.chat_template == "auto" and not has_markers):
        tok.chat_template = falcon_h1_chat_template()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def chat_ids(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    """Token ids of a conversation through the chat template (transformers 5 returns a BatchEncoding there)."""
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def quantization_config(model_args):
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    # never quantize Mamba's out_proj (read raw by the fused kernel) nor the µP-scaled lm_head
    return BitsAndBytesConfig(
        load_in_4bit=model_args.load_in_4bit,
        load_in_8bit=model_args.load_in_8bit,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["out_proj", "lm_head"],
    )


def load_model(model_args, align_args: AlignArguments, trust_remote_code: bool = False):
    """Our FalconH1ForCausalLM for falcon_h1 checkpoints (and presets); any other model through Auto*."""
    if align_args.runtime:
        configure(**align_args.runtime)
    if align_args.activation_offload or align_args.context_parallel_size > 1:
        expandable_segments()
    model = _load(model_args, align_args, trust_remote_code)
    long_rows = dict(offload_activations=True, mlp_chunk_tokens=MLP_CHUNK_TOKENS)
    if align_args.activation_offload and not configure_backbones(model, **long_rows):
        raise ValueError("activation_offload needs falcon-align's Falcon-H1 model (model_type falcon_h1)")
    return model


def expandable_segments() -> bool:
    """Long rows allocate and free GiB-sized blocks layer after layer, and the allocator's fixed segments then
    fragment: memory stays reserved but cannot hold the next block (docs/performance.md, long context).
    Expandable segments, unless the user's allocator settings (PYTORCH_ALLOC_CONF, or the older
    PYTORCH_CUDA_ALLOC_CONF) say otherwise; before the model reaches the GPU. Expandable segments do not support
    CUDA IPC (tensors shared between processes)."""
    if not torch.cuda.is_available() or {"PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"} & set(os.environ):
        return False
    torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    return True


def _load(model_args, align_args, trust_remote_code):
    dtype = _dtype(model_args.dtype)
    if align_args.init_preset:
        torch.manual_seed(0)
        model = FalconH1ForCausalLM(preset_config(align_args.init_preset))
        return model.to(dtype) if dtype else model
    trust = trust_remote_code
    kwargs = dict(trust_remote_code=trust, quantization_config=quantization_config(model_args))
    if dtype is not None:
        kwargs["dtype"] = dtype
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=trust)
    if config.model_type == "falcon_h1":
        return FalconH1ForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)


def peft_config(model_args):
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=lora_targets(model_args.lora_target_modules),
        task_type="CAUSAL_LM",
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
    )


def resume_checkpoint(resume, output_dir):
    """`resume_from_checkpoint: latest` → the newest checkpoint in output_dir (None when there is none)."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume == "latest":
        return get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    return resume


def merge_saved_adapter(model_args, align_args, adapter_dir, tokenizer, trust=False):
    """Base weights + the adapter as saved → one plain checkpoint in adapter_dir/merged (vanilla-loadable).
    Built from disk, so the trainer's model stays a PEFT model and the saved adapter is what gets merged."""
    from peft import PeftModel

    merged_dir = Path(adapter_dir) / "merged"
    base = load_model(model_args, align_args, trust)
    PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    logger.info("merged model saved to %s", merged_dir)
    return merged_dir
