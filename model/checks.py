"""Range checks on token ids where they enter the model: the embedding's input and the loss's labels.

An id past the embedding is an IndexError on CPU and a device-side assert on CUDA (which poisons the CUDA context);
a label between the vocabulary and the padded head meets a −inf logit, so the loss is inf while the gradients stay
finite. Both checks are one reduction and one host sync; they are skipped while compiling or capturing a CUDA graph.
A checkpoint's weight files are checked from their headers before loading, so a damaged one is named by its path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

IGNORE_INDEX = -100


def _skipped(ids: torch.Tensor) -> bool:
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return True
    return ids.is_cuda and torch.cuda.is_current_stream_capturing()


def _outside(ids: torch.Tensor, vocab: int) -> tuple[int, list[int]] | None:
    """→ (how many, up to five of them) for ids outside [0, vocab), or None."""
    bad = (ids < 0) | (ids >= vocab)
    if not bool(bad.any()):
        return None
    return int(bad.sum()), ids[bad].unique()[:5].tolist()


def check_input_ids(input_ids: torch.Tensor, vocab: int) -> None:
    """Raises for an input id outside [0, vocab). On CUDA a one-token step (decoding: the model's own sampled ids) is
    not checked, so generation adds no sync per token; prompts and training batches are."""
    if _skipped(input_ids) or (input_ids.is_cuda and input_ids.size(-1) == 1):
        return
    found = _outside(input_ids, vocab)
    if found:
        raise ValueError(
            f"input_ids hold {found[0]} token id(s) outside the vocabulary [0, {vocab}), e.g. {found[1]}: "
            "the tokenizer and the checkpoint do not match"
        )


def check_labels(labels: torch.Tensor, vocab: int) -> None:
    """Raises for a scored label (ignore index removed) outside [0, vocab)."""
    if _skipped(labels):
        return
    found = _outside(labels, vocab)
    if found:
        raise ValueError(
            f"labels hold {found[0]} token id(s) outside the vocabulary [0, {vocab}) other than the ignore index "
            f"{IGNORE_INDEX}, e.g. {found[1]}: the tokenizer and the model do not match, or the labels were built wrong"
        )


def weight_file_problems(folder) -> list[str]:
    """What is wrong with a checkpoint folder's weight files, read from their headers alone: a .safetensors file
    that is empty or cut short (a save killed half-way, a partial copy), or a shard its index names but lacks."""
    folder, problems = Path(folder), []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            problems.append(f"{path} is damaged ({err}; {path.stat().st_size:,} bytes)")
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError):
            problems.append(f"{index} is not a valid shard index")
            continue
        missing = [name for name in sorted(shards) if not (folder / name).is_file()]
        problems += [f"{folder / name}: a shard {index.name} names is missing" for name in missing]
    return problems
