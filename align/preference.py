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
- The padded batches' real tokens are located on the host, in the collator (`HostUnpaddedCollator`), so the
  packed forward does not read the attention mask back from the device.
- **A step that does not wait for the GPU** (`sync_free`; on by default on CUDA): TRL's step reads 13 metrics back
  with `.item()` and picks the chosen tokens' logits by boolean indexing, each micro-batch, before the backward is
  launched; the GPU idles through every round trip (18 ms of a 138 ms 0.5B step on an H100,
  bench/results/h100-user-paths-dpo-0.5b-budgets-2026-12-08.json). Here the same loss and the same metrics are
  computed on the device and read at the next log, in one go (align/device_metrics.py). It covers the standard DPO
  divergence with `sigmoid`, `sigmoid_norm`/`dpo_norm` and `sft` losses on precomputed reference log-probs, what the
  shipped recipes run; anything else takes TRL's step. One wait remains, in TRL's fused LM head: on CUDA it picks
  the scored positions by boolean indexing, once a micro-batch, as the forward's last step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import trl
from accelerate.utils import broadcast_object_list
from datasets import Dataset, Features, Value, concatenate_datasets
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from trl import DPOTrainer

from align.device_metrics import DeviceMetrics
from align.fast_path import falcon_model
from align.sft_trainer import HostCheckedCollator
from model.kernels import get_ops
from model.modeling import configure_backbones

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
    return configure_backbones(model, padding_free=enabled)


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


class HostUnpaddedCollator(HostCheckedCollator):
    """TRL's preference batches (chosen rows, then rejected rows, right-padded), with what the model's padding-free
    forward would otherwise read back from the device found on the host: the flat index of every real token
    (`real_token_index`), the rows' boundaries among them and the longest row (`cu_seq_lens_q`, `max_length_q`); the
    token ids are range-checked here too (`checked_ids`)."""

    def __call__(self, examples):
        batch = super().__call__(examples)
        real = batch["attention_mask"].bool()  # (2n, l)
        lengths = real.sum(1)
        batch["real_token_index"] = real.reshape(-1).nonzero().squeeze(1)
        batch["cu_seq_lens_q"] = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        batch["max_length_q"] = int(lengths.max())
        batch["checked_ids"] = True
        return batch


# the losses the sync-free step computes (TRL's names), each per pair from the same log-probs as TRL's step
OWN_STEP_LOSSES = {"sigmoid", "sigmoid_norm", "sft"}


class FalconDPOTrainer(DeviceMetrics, DPOTrainer):
    """TRL's DPOTrainer with padding-free pairs, a keyed disk cache of reference log-probs, counted drops and a step
    that does not wait for the GPU.

    `ref_logps_cache_dir`: where precomputed reference log-probs are kept (None: TRL's behaviour).
    `sync_free`: take the sync-free step where it covers the configuration (None: on CUDA, the only place a read of
    the device costs a wait; on CPU TRL's own step runs).
    """

    def __init__(self, *args, ref_logps_cache_dir: str | None = None, sync_free: bool | None = None, **kwargs):
        config = kwargs["args"]
        self.ref_logps_cache_dir = Path(ref_logps_cache_dir) if ref_logps_cache_dir else None
        self.ref_cache_events: list[tuple[str, str]] = []  # (split, "hit" | "miss"), for logs and tests
        self.dropped_pairs: dict[str, int] = {}
        config.loss_type = resolve_loss_types(config.loss_type)
        # TRL's own padding_free only warns and pads (and TRL resets `self.padding_free` to False); ours runs in
        # the model, so it must be on before TRL precomputes reference log-probs inside its __init__
        self.packed_pairs = bool(config.padding_free)
        config.padding_free = False
        if self.packed_pairs:
            models = [kwargs.get("model"), kwargs.get("ref_model")]
            found = [set_padding_free(m, True) for m in models if isinstance(m, torch.nn.Module)]
            if not all(found):
                logger.warning("padding_free needs falcon-align's Falcon-H1 model; other models run padded")
        super().__init__(*args, **kwargs)
        self.args.padding_free = self.packed_pairs  # saved and logged as asked
        ours = falcon_model(self.model)
        if self.packed_pairs and ours is not None:  # the training batches' real tokens found on the host
            self.data_collator = HostUnpaddedCollator(self.data_collator, ours.config.vocab_size)
        if sync_free is None:
            sync_free = self.args.device.type == "cuda"
        self.own_step = (
            sync_free
            and self.precompute_ref_logps
            and set(self.loss_types) <= OWN_STEP_LOSSES
            and self.f_divergence_type == "reverse_kl"
            and self.ld_alpha is None
            and not self.use_weighting
            and not self.aux_loss_enabled
        )
        if self.own_step:
            self._keep_metrics_on_device()

    # ------------------------------------------------------------------ the sync-free step
    def _compute_loss(self, model, inputs, return_outputs):
        """TRL's loss and metrics for the configurations `own_step` covers, with no read of the device: counts and
        means are masked sums, and every metric stays a device tensor until the next log."""
        if not self.own_step or return_outputs:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        completion = inputs["completion_mask"]  # (2n, l): chosen rows, then rejected rows
        kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", *REF_COLUMNS)}
        kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(completion == 0, -100)
        out = model(**kwargs, labels=labels, fused_lm_head=True)  # TRL's fused head: per-token outputs (2n, l-1)
        scored = completion[:, 1:]  # the positions whose next token is a completion token
        width = scored.size(1)
        per_token = out.log_probs[:, -width:]
        chosen, rejected = per_token.sum(1).chunk(2)
        chosen_ratio = chosen - inputs["ref_chosen_logps"]
        rejected_ratio = rejected - inputs["ref_rejected_logps"]
        lengths = completion.sum(1).clamp(min=1.0).chunk(2)  # TRL's sigmoid_norm normalises by these
        loss = 0.0
        for name, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if name == "sigmoid":
                per_pair = -F.logsigmoid(self.beta * (chosen_ratio - rejected_ratio))
            elif name == "sigmoid_norm":
                per_pair = -F.logsigmoid(self.beta * (chosen_ratio / lengths[0] - rejected_ratio / lengths[1]))
            else:  # sft: the mean NLL of the chosen completions' tokens (0 where none is scored; TRL's mean: NaN)
                chosen_scored = scored.chunk(2)[0]
                nll = -(per_token.chunk(2)[0] * chosen_scored).sum() / chosen_scored.sum().clamp(min=1)
                per_pair = nll.expand(chosen.size(0))
            loss = loss + per_pair.mean() * weight
        self._record_pairs(mode, out, inputs, scored, (chosen, rejected), (chosen_ratio, rejected_ratio))
        return loss

    def _record_pairs(self, mode, out, inputs, scored, logps, ratios):
        """TRL's per-micro-batch DPO metrics as 0-d device tensors (0 where a ratio has no tokens), gathered over
        ranks as TRL gathers each."""
        gather, gather_all = self.accelerator.gather_for_metrics, self.accelerator.gather
        hold = partial(self._hold, mode)
        width = scored.size(1)

        def ratio(total, count):
            total, count = gather(total).sum(), gather(count).sum()
            return torch.where(count > 0, total / count.clamp(min=1), 0.0)

        weights = scored.to(out.entropy.dtype)
        hold("entropy", ratio((out.entropy[:, -width:].detach() * weights).sum(), scored.sum()))
        if mode == "train":
            self._count_tokens(gather(inputs["attention_mask"].sum()).sum() // self._tp_size)
        sides = zip(("chosen", "rejected"), out.mean_logits[:, -width:].chunk(2), scored.chunk(2))
        for side, mean_logits, mask in sides:
            hold(f"logits/{side}", ratio(torch.where(mask.bool(), mean_logits, 0).sum(), mask.sum()))
        chosen_scored = scored.chunk(2)[0]
        top1 = out.is_top1[:, -width:].chunk(2)[0] & chosen_scored.bool()
        hold("mean_token_accuracy", ratio(top1.sum(), chosen_scored.sum()))
        chosen_reward, rejected_reward = (self.beta * r.detach() for r in ratios)
        hold("rewards/chosen", gather_all(chosen_reward).mean())
        hold("rewards/rejected", gather_all(rejected_reward).mean())
        hold("rewards/accuracies", gather_all((chosen_reward > rejected_reward).float()).mean())
        hold("rewards/margins", gather_all(chosen_reward - rejected_reward).mean())
        hold("logps/chosen", gather_all(logps[0].detach()).mean())
        hold("logps/rejected", gather_all(logps[1].detach()).mean())

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
        reference = self.ref_model or self.model
        parts = {
            "reference_weights": self._precompute_model_hash,  # TRL's hash of the reference state dict
            "reference_config": reference.config.to_json_string(use_diff=False),  # multipliers, RoPE, chunking
            "tokens": hash_token_columns(dataset),
            "max_length": args.max_length,
            "truncation_mode": args.truncation_mode,
            "ld_alpha": args.ld_alpha,
            "precision": {"bf16": args.bf16, "fp16": args.fp16, "dtype": str(reference.dtype)},
            "padding_free": self.packed_pairs,
            "kernels": get_ops(self.accelerator.device).name,
            "trl": trl.__version__,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if self.ref_logps_cache_dir is None:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        # one decision for all ranks: rank 0's key and whether its file exists (weights can hash differently on
        # other ranks, e.g. sharded; a split decision would leave ranks waiting in different collectives)
        decision = [None]
        if self.accelerator.is_main_process:
            key = self.ref_logps_key(dataset)
            path = self.ref_logps_cache_dir / f"{name}-{key}.safetensors"
            decision = [(str(path), path.exists() and _rows_in(path) == len(dataset))]
        broadcast_object_list(decision, from_process=0)
        path, hit = Path(decision[0][0]), decision[0][1]
        self.ref_cache_events.append((name, "hit" if hit else "miss"))
        if hit:
            logger.info("%s: reference log-probs reused from %s", name, path)
            cached = load_file(path)
        else:
            cached = self._reference_logps(dataset, name, batch_size)
            if self.accelerator.is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(f".tmp{os.getpid()}")
                save_file(cached, partial)
                os.replace(partial, path)  # readers never see half a file
                logger.info("%s: reference log-probs cached at %s", name, path)
            self.accelerator.wait_for_everyone()
        columns = Dataset.from_dict(
            {k: cached[k].tolist() for k in REF_COLUMNS}, features=Features({k: Value("float32") for k in REF_COLUMNS})
        )
        return concatenate_datasets([dataset, columns], axis=1)

    def _reference_logps(self, dataset, name, batch_size) -> dict:
        """Reference log-probs of every pair, in dataset order, on every rank: {column: (n,) fp32}. Computed here,
        not through TRL's own cache (keyed on the dataset fingerprint and weights only; for in-memory datasets a
        per-process temporary file)."""
        if self.is_deepspeed_enabled:  # TRL wraps the model in a DeepSpeed inference engine first: use its pass
            key = self._precompute_model_hash
            self._precompute_model_hash = self.ref_logps_key(dataset)  # makes TRL's cache file ours alone
            try:
                out = super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                self._precompute_model_hash = key
            return {k: torch.tensor(out[k], dtype=torch.float32) for k in REF_COLUMNS}
        loader = self.accelerator.prepare(
            DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
        )
        model = self.ref_model or self.model
        chosen, rejected = [], []
        for batch in loader:
            c, r = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        return {"ref_chosen_logps": torch.cat(chosen), "ref_rejected_logps": torch.cat(rejected)}


REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def _rows_in(path: Path) -> int:
    """Pairs in a cache file, read from its header alone (the file is loaded once, on a hit)."""
    try:
        with safe_open(path, framework="pt") as f:
            return f.get_slice("ref_chosen_logps").get_shape()[0]
    except Exception:  # a damaged file is a miss
        return -1
