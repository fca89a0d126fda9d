"""TRL's SFTTrainer, with a training step that does not wait for the GPU when it trains falcon-align's Falcon-H1.

TRL 1.16's step reads its metrics back every micro-batch (entropy, top-1 accuracy and token counts with `.item()`),
scores the loss on the labelled positions picked by boolean indexing (each a device-to-host sync), and the Trainer
tests every loss for NaN on the host. Each such read stalls the host until the GPU has drained, and the GPU then idles
until the host has launched the next kernels. Here, on our model on CUDA:

- the loss and the metrics come from the model's own chunked head (`loss_metrics=True`): every position is scored,
  unlabelled ones weighted by zero, so the loss, every gradient and the metrics equal TRL's with no sync;
- the metrics stay on the device until a log reads them, in one go, and log the same averages as TRL's;
- token ids and labels are range-checked on the host, in the collator, before they reach the device (the model's
  device check is skipped);
- the Trainer's NaN filter runs on the device: a non-finite loss counts as the mean of those logged so far, as there;
- `include_num_input_tokens_seen: all` counts on the host in one process.

On CPU, where a read costs no wait, TRL's own step runs (`sync_free` chooses). Other models, and TRL's paths this
does not cover (`compute_loss_func`, label smoothing, the DFT loss, MoE auxiliary
losses, Ulysses sequence parallelism, `return_outputs`), take TRL's own step.
"""

from __future__ import annotations

import torch
from trl import SFTTrainer

from align.device_metrics import DeviceMetrics
from align.fast_path import falcon_model
from model.checks import IGNORE_INDEX, check_input_ids, check_labels

_DEVICE_METRICS = ("entropy", "mean_token_accuracy")


class HostCheckedCollator:
    """A collator whose batches have their token ids and labels checked against the vocabulary on the host, where
    the check costs no wait for the device; a bad id raises the model's error naming it."""

    def __init__(self, collate, vocab: int):
        self.collate, self.vocab = collate, vocab

    def __call__(self, examples):
        batch = self.collate(examples)
        check_input_ids(batch["input_ids"], self.vocab)
        labels = batch.get("labels")
        if labels is not None:
            check_labels(labels[labels != IGNORE_INDEX], self.vocab)
        return batch


class FalconSFTTrainer(DeviceMetrics, SFTTrainer):
    """sync_free: take the step above (None: where the model trains on CUDA, the only place a read of the device costs a
    wait; on CPU TRL's own step runs, and the offline default's figures stay those of TRL's arithmetic)."""

    def __init__(self, *args, sync_free: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        ours = falcon_model(self.model)
        if sync_free is None:
            sync_free = self.args.device.type == "cuda"
        self.own_step = (
            sync_free
            and ours is not None
            and self.compute_loss_func is None
            and self.label_smoother is None
            and self.args.loss_type == "nll"
            and not self.aux_loss_enabled
        )
        if self.own_step:
            self.data_collator = HostCheckedCollator(self.data_collator, ours.config.vocab_size)
            self._keep_metrics_on_device()

    def _sequence_parallel(self) -> bool:
        config = getattr(self.accelerator, "parallelism_config", None)
        return config is not None and config.sp_backend == "deepspeed" and config.sp_enabled

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.own_step or return_outputs or (self.model.training and self._sequence_parallel()):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch, loss_metrics=True, checked_ids=True)
        loss = outputs.loss
        # like TRL: num_items_in_batch counts every rank's tokens, and DDP averages the gradients across ranks
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        self._record(mode, outputs.token_metrics, inputs)
        return loss

    def _record(self, mode, metrics, inputs):
        """TRL's per-micro-batch metrics, kept on the device: entropy and top-1 accuracy over the scored tokens of
        every rank (0 where none is scored), and the tokens trained."""
        gather = self.accelerator.gather_for_metrics
        scored = gather(metrics.scored).sum()
        nonzero = scored.clamp(min=1)
        for name, total in zip(_DEVICE_METRICS, (metrics.entropy, metrics.hits)):
            value = torch.where(scored > 0, gather(total.detach()).sum() / nonzero, 0.0)
            self._hold(mode, name, value)
        if mode != "train":
            return
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        elif "position_ids" in inputs:
            ids = inputs["position_ids"]  # padding-free: the row's length, made on the device without a host copy
            local = torch.full((), ids.size(1), device=ids.device, dtype=torch.long)
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
        self._count_tokens(gather(local).sum() // self._tp_size)

    def _track_num_input_tokens(self, inputs):
        """`include_num_input_tokens_seen: all` in one process counts the input's shape on the host, where the Trainer
        copies the count to the device and reads it back every micro-batch; the same count."""
        main = getattr(self.model, "main_input_name", "input_ids")
        if self.args.include_num_input_tokens_seen == "all" and self.accelerator.num_processes == 1 and main in inputs:
            self.state.num_input_tokens_seen += inputs[main].numel()
            return
        super()._track_num_input_tokens(inputs)
