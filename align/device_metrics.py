"""What a TRL training step needs so that it never waits for the GPU, shared by the SFT and DPO steps
(align/sft_trainer.py, align/preference.py).

TRL 1.16 reads every logged metric back with `.item()` each micro-batch, and the Trainer reads each loss back to
filter NaNs. Each read stalls the host until the GPU has drained; the GPU then idles until the host has launched the
next kernels. Here the metrics stay on the device, as 0-d tensors in the trainer's `_metrics` lists, and become floats
in one read when a log needs them, or when more than `held_limit` wait; the NaN filter runs on the device.
"""

from __future__ import annotations

import torch
from torch import is_tensor


class DeviceMetrics:
    """Mixin for TRL trainers (their `_metrics[mode]` lists of per-micro-batch values, `_total_train_tokens`). Call
    `_keep_metrics_on_device()` once the step is known to take this path; then hold each 0-d device tensor with
    `_hold` and pass each micro-batch's trained tokens to `_count_tokens`."""

    # device tensors held between logs, at most (a read of all of them beyond: with logging off or rare, the
    # per-micro-batch tensors would otherwise pile up in GPU memory)
    held_limit = 1024
    _nan_filter = False
    _device_tokens = None  # (), int64: tokens trained since the last log, on the device
    _held = None  # {mode: device tensors held in _metrics}, once the metrics stay on the device

    def _keep_metrics_on_device(self) -> None:
        # the Trainer's filter reads the loss back every micro-batch; training_step applies it on the device
        self._nan_filter, self.args.logging_nan_inf_filter = self.args.logging_nan_inf_filter, False
        self._held = {"train": 0, "eval": 0}

    def _hold(self, mode: str, name: str, value: torch.Tensor) -> None:
        """A metric of this micro-batch, kept on the device (TRL appends a float)."""
        self._metrics[mode][name].append(value)
        self._held[mode] += 1
        if self._held[mode] >= self.held_limit:
            self._read_device_metrics(mode)

    def _count_tokens(self, tokens: torch.Tensor) -> None:
        self._device_tokens = tokens if self._device_tokens is None else self._device_tokens + tokens

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._nan_filter:  # the Trainer's rule: a non-finite loss adds the mean of the losses since the last log
            since = 1 + self.state.global_step - self._globalstep_last_logged
            loss = torch.where(torch.isfinite(loss), loss, self._tr_loss / since)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._read_device_metrics("train" if self.model.training else "eval")
        super().log(logs, start_time)

    def _read_device_metrics(self, mode: str) -> None:
        """The device-held metrics since the last log become floats, in one read of the device; `num_tokens` becomes
        TRL's: the training tokens so far (also in evaluation logs)."""
        metrics = self._metrics[mode]
        if self._held is not None:
            self._held[mode] = 0
        held = [(name, i) for name, values in metrics.items() for i, v in enumerate(values) if is_tensor(v)]
        tensors = [metrics[name][i] for name, i in held]
        if self._device_tokens is not None:
            tensors.append(self._device_tokens)
        if not tensors:
            return
        values = torch.stack([t.to(torch.float64) for t in tensors]).tolist()
        for (name, i), value in zip(held, values):
            metrics[name][i] = value
        if self._device_tokens is not None:
            self._total_train_tokens += round(values[-1])
            self._device_tokens = None
        metrics["num_tokens"] = [self._total_train_tokens]
