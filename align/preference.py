"""DPO on top of TRL's `DPOTrainer`: padding-free pairs, a disk cache of reference log-probs, counted drops.

What TRL 1.16 leaves out and this adds:
- **Padding-free DPO.** TRL turns `padding_free` off ("temporarily unavailable"). Here the padded batch that
  TRL's collator builds (chosen rows then rejected rows) runs inside falcon-align's model as one packed row of
  its real tokens, each sequence its own document in the SSM scan, the conv and attention
  (`FalconH1ForCausalLM.set_padding_free`). Log-probs equal the padded computation; pads cost nothing.
- **Reference log-probs cached on disk** (`precompute_ref_log_probs: true` + `ref_logps_cache_dir`): one file per
  key, and the key hashes everything that changes the numbers — the reference weights, the tokenized pairs,
  max_length, truncation, ld_alpha, precision, padding-free and the kernel choice. TRL's own cache keys on the
  dataset fingerprint and the weights only, and for in-memory datasets it lives in a temporary folder.
- **Loss names**: TRL's by name, plus `dpo_norm` (TII's length-normalised DPO, open-instruct's name), which is
  exactly TRL's `sigmoid_norm` (tests/align/test_dpo_losses.py proves it on hand-made log-probs).
- Pairs TRL drops (a prompt that fills max_length) are counted and logged, not lost silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import trl
from datasets import Dataset, Features, Value, concatenate_datasets
from safetensors.torch import load_file, save_file
from trl import DPOTrainer

from model.kernels import get_ops
from model.modeling import FalconH1Model

logger = logging.getLogger("falcon_align.dpo")

# every loss TRL 1.16's DPOTrainer implements, by the name its `loss_type` takes
TRL_LOSSES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
LOSS_ALIASES = {"dpo_norm": "sigmoid_norm"}  # open-instruct / the Falcon-H1 report call it dpo_norm


def resolve_loss_types(names) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    resolved = [LOSS_ALIASES.get(n, n) for n in names]
    unknown = [n for n in resolved if n not in TRL_LOSSES]
    if unknown:
        raise ValueError(f"loss_type {unknown} unknown; choose from {sorted(TRL_LOSSES + tuple(LOSS_ALIASES))}")
    return resolved


def dpo_norm_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_len, rejected_len, beta):
    """TII's length-normalised DPO (open-instruct `dpo_norm`), per pair: each sequence's summed completion
    log-prob divided by its completion length, then the sigmoid DPO loss. Inputs (n,); returns (n,)."""
    policy = chosen_logps / chosen_len - rejected_logps / rejected_len
    reference = ref_chosen_logps / chosen_len - ref_rejected_logps / rejected_len
    return -torch.nn.functional.logsigmoid(beta * (policy - reference))


def set_padding_free(model, enabled: bool) -> bool:
    """Turns padding-free execution on in every falcon-align backbone inside `model` (PEFT wrappers included).
    False when there is none: other models run padded."""
    found = False
    for module in model.modules():
        if isinstance(module, FalconH1Model):
            module.padding_free = enabled
            found = True
    return found


def hash_token_columns(dataset, columns=("prompt_ids", "chosen_ids", "rejected_ids")) -> str:
    """sha256 over the token ids of the given list columns, in row order (arrow buffers, no Python loop)."""
    h = hashlib.sha256()
    for batch in dataset.select_columns(list(columns)).with_format("arrow").iter(batch_size=4096):
        for name in columns:
            column = batch.column(name).combine_chunks()
            h.update(name.encode())
            h.update(column.value_lengths().to_numpy(zero_copy_only=False).tobytes())
            h.update(column.flatten().to_numpy(zero_copy_only=False).astype("int64").tobytes())
    return h.hexdigest()


class FalconDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer with padding-free pairs, a keyed disk cache of reference log-probs and counted drops.

    `ref_logps_cache_dir`: where precomputed reference log-probs are kept (None: TRL's behaviour).
    """

    def __init__(self, *args, ref_logps_cache_dir: str | None = None, **kwargs):
        config = kwargs["args"]
        self.ref_logps_cache_dir = Path(ref_logps_cache_dir) if ref_logps_cache_dir else None
        self.ref_cache_events: list[tuple[str, str]] = []  # (split, "hit" | "miss"), for logs and tests
        self.dropped_pairs: dict[str, int] = {}
        config.loss_type = resolve_loss_types(config.loss_type)
        # TRL's own padding_free only warns and pads; ours runs in the model, so it must be on before TRL
        # precomputes reference log-probs inside its __init__
        self.padding_free = bool(config.padding_free)
        config.padding_free = False
        if self.padding_free:
            models = [kwargs.get("model"), kwargs.get("ref_model")]
            found = [set_padding_free(m, True) for m in models if isinstance(m, torch.nn.Module)]
            if not all(found):
                logger.warning("padding_free needs falcon-align's Falcon-H1 model; other models run padded")
        super().__init__(*args, **kwargs)
        self.args.padding_free = self.padding_free  # saved and logged as asked

    # ------------------------------------------------------------------ counted drops
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        before = len(dataset) if hasattr(dataset, "__len__") else None
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if before is not None:
            dropped = before - len(dataset)
            self.dropped_pairs[dataset_name] = dropped
            if dropped:
                logger.warning(
                    "%s: %d of %d pairs dropped: the prompt alone fills max_length=%s (raise max_length to keep them)",
                    dataset_name,
                    dropped,
                    before,
                    args.max_length,
                )
        return dataset

    # ------------------------------------------------------------------ reference log-prob cache
    def ref_logps_key(self, dataset) -> str:
        """Everything that changes the reference log-probs of `dataset`, hashed."""
        args = self.args
        parts = {
            "reference_weights": self._precompute_model_hash,
            "tokens": hash_token_columns(dataset),
            "max_length": args.max_length,
            "truncation_mode": args.truncation_mode,
            "ld_alpha": args.ld_alpha,
            "precision": {"bf16": args.bf16, "fp16": args.fp16, "dtype": str(self.model.dtype)},
            "padding_free": self.padding_free,
            "kernels": get_ops(self.accelerator.device).name,
            "trl": trl.__version__,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if self.ref_logps_cache_dir is None:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        path = self.ref_logps_cache_dir / f"{name}-{self.ref_logps_key(dataset)}.safetensors"
        if path.exists():
            cached = load_file(path)
            if cached["ref_chosen_logps"].numel() == len(dataset):
                self.ref_cache_events.append((name, "hit"))
                logger.info("%s: reference log-probs reused from %s", name, path)
                columns = Dataset.from_dict(
                    {k: v.tolist() for k, v in cached.items()},
                    features=Features({k: Value("float32") for k in cached}),
                )
                return concatenate_datasets([dataset, columns], axis=1)
        self.ref_cache_events.append((name, "miss"))
        dataset = super()._precompute_ref_logps(dataset, name, batch_size)
        if self.accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            names = ("ref_chosen_logps", "ref_rejected_logps")
            save_file({k: torch.tensor(dataset[k], dtype=torch.float32) for k in names}, path)
            logger.info("%s: reference log-probs cached at %s", name, path)
        return dataset
