"""Model, tokenizer, PEFT, checkpoint and merge set-up shared by the alignment stages."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import zipfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from model import FalconH1ForCausalLM, preset_config
from model.checks import weight_file_problems
from model.modeling import MLP_CHUNK_TOKENS, configure_backbones
from model.settings import configure

from .args import AlignArguments, lora_targets
from .templates import falcon_h1_chat_template
from .validate import InputError, check_checkpoint_path

logger = logging.getLogger("falcon_align")


def _dtype(name):
    if name in (None, "auto"):
        return None
    return getattr(torch, name) if isinstance(name, str) else name


def load_tokenizer(model_args, align_args: AlignArguments, trust_remote_code: bool = False):
    name = align_args.tokenizer_name_or_path or model_args.model_name_or_path
    check_checkpoint_path(name, "tokenizer_name_or_path" if align_args.tokenizer_name_or_path else "model_name_or_path")
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if align_args.chat_template == "tokenizer" and not tok.chat_template:
        problem = f"tokenizer: the tokenizer of {name} has no chat template; use auto or falcon_h1"
        raise InputError(problem, "chat_template")
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


def load_reference(model_args, align_args: AlignArguments, trust_remote_code: bool = False):
    """The frozen reference of a preference or RL stage: `ref_model_name_or_path`, else the starting weights."""
    ref_args = copy.copy(model_args)
    ref_args.model_name_or_path = align_args.ref_model_name_or_path or model_args.model_name_or_path
    return load_model(ref_args, align_args, trust_remote_code).eval()


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
    check_loadable(model_args.model_name_or_path)
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


def check_loadable(path, field="model_name_or_path") -> None:
    """A local checkpoint folder exists, holds a config and undamaged weight files (hub ids pass), else an error
    naming the path; transformers' own messages name neither ("Repo id must be in the form…", a bare
    SafetensorError)."""
    check_checkpoint_path(path, field)
    problems = weight_file_problems(path) if Path(path).is_dir() else []
    if problems:
        raise InputError("; ".join(problems), field)


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
    """The checkpoint a run continues from, said in a log line. `latest`: the newest *complete* checkpoint in
    output_dir; one a kill left half-written is skipped with a warning naming what it lacks, and with none at all
    the run starts from step 0 with a warning (rerunning one command after a preemption is the point of `latest`).
    An explicit path must be a complete checkpoint."""
    if resume in (None, "", False):
        return None
    if resume == "latest":
        for folder in sorted(_checkpoints(output_dir), key=_step, reverse=True):
            problems = checkpoint_problems(folder)
            if not problems:
                logger.info("resuming from %s (step %d), the newest complete checkpoint", folder, _step(folder))
                return str(folder)
            logger.warning("skipping incomplete checkpoint %s: %s", folder, "; ".join(problems))
        logger.warning(
            "resume_from_checkpoint: latest: no complete checkpoint in %s, training starts from step 0", output_dir
        )
        return None
    folder = Path(resume)
    if not folder.is_dir():
        raise InputError(f"{resume}: no such checkpoint folder", "resume_from_checkpoint")
    problems = checkpoint_problems(folder)
    if problems:
        raise InputError(f"{resume}: incomplete checkpoint: " + "; ".join(problems), "resume_from_checkpoint")
    logger.info("resuming from %s", folder)
    return str(folder)


def _checkpoints(output_dir) -> list[Path]:
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]


def _step(folder: Path) -> int:
    return int(folder.name.rsplit("-", 1)[1])


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")


def checkpoint_problems(folder) -> list[str]:
    """Why a Trainer checkpoint cannot be resumed from ([] when it can). The Trainer writes trainer_state.json
    last, so a save killed part-way lacks it; a kill can also leave a file empty or cut short."""
    folder, problems = Path(folder), []
    state = folder / "trainer_state.json"
    if not state.is_file():
        problems.append("no trainer_state.json (written last: the save did not finish)")
    else:
        try:
            json.loads(state.read_text())["global_step"]
        except (ValueError, KeyError, TypeError):
            problems.append("trainer_state.json is cut short or not a trainer state")
    problems += [
        f"{p.relative_to(folder)} is empty" for p in sorted(folder.rglob("*")) if p.is_file() and not p.stat().st_size
    ]
    has_weights = any((folder / name).is_file() for name in WEIGHT_FILES) or any(p.is_dir() for p in folder.iterdir())
    if not has_weights:  # sharded FSDP and DeepSpeed checkpoints keep theirs in sub-folders
        problems.append("no model weights")
    problems += [p.replace(f"{folder}/", "") for p in weight_file_problems(folder)]
    for path in sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth")):
        if path.stat().st_size and not zipfile.is_zipfile(path):  # torch.save writes a zip archive
            problems.append(f"{path.name} is cut short (not a complete torch.save archive)")
    return problems


def merge_saved_adapter(model_args, align_args, adapter_dir, tokenizer, trust=False):
    """Base weights + the adapter as saved → one plain checkpoint in adapter_dir/merged (vanilla-loadable).
    Built from disk, so the trainer's model stays a PEFT model and the saved adapter is what gets merged."""
    from peft import PeftModel

    merged_dir = Path(adapter_dir) / "merged"
    check_loadable(adapter_dir, "output_dir")
    base = load_model(model_args, align_args, trust)
    PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    logger.info("merged model saved to %s", merged_dir)
    return merged_dir
