"""FalconDPOTrainer's sync-free step: the DPO loss and every metric on the device, read at the log, train and log as
TRL's own step does (taken here on CPU, where the default is TRL's)."""

from functools import partial

import pytest
import torch

from align import dpo
from align.preference import FalconDPOTrainer
from tests.align.test_dpo import _history, base, make_trainer, run_dpo  # noqa: F401  (base: a fixture)
from tests.conftest import rel_err
from tests.model.test_host_reads import HostReads, _varlen

STEPS = ("--max_steps", "4", "--learning_rate", "3e-3", "--gradient_accumulation_steps", "2")
STEPS += ("--per_device_train_batch_size", "4", "--padding_free", "True", "--precompute_ref_log_probs", "True")
STEPS += (
    "--eval_fraction",
    "0.25",
    "--eval_strategy",
    "steps",
    "--eval_steps",
    "2",
    "--per_device_eval_batch_size",
    "4",
)
METRICS = ("loss", "grad_norm", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")
METRICS += ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen")
METRICS += ("logps/rejected",)


def _close(got, want, key):
    assert len(got) == len(want) > 0, key
    assert all(abs(a - b) <= 1e-5 * max(abs(b), 1e-3) for a, b in zip(got, want)), (key, got, want)


@pytest.mark.parametrize(
    "losses, held_limit",
    [(["dpo_norm", "sft"], None), (["sigmoid"], None), (["dpo_norm", "sft"], 7)],
    ids=["dpo_norm+sft", "sigmoid", "dpo_norm+sft-read-between-logs"],
)
def test_sync_free_step_trains_and_logs_as_trls(base, tmp_path, monkeypatch, losses, held_limit):  # noqa: F811
    """4 steps of 2 micro-batches and 2 evaluations: the same loss, gradient norm and DPO metrics at every log
    (training and evaluation), the same token count, and the same weights after; also where the held metrics (11 a
    micro-batch) are read before a log, as they are past `held_limit` (say, with logging off)."""
    args = (*STEPS, "--loss_type", *losses)
    theirs = run_dpo(base, tmp_path / "trl", *args)
    assert not theirs.own_step  # on CPU: TRL's step
    monkeypatch.setattr(dpo, "FalconDPOTrainer", partial(FalconDPOTrainer, sync_free=True))
    held = []  # device tensors held after each metric of a micro-batch
    if held_limit:
        monkeypatch.setattr(FalconDPOTrainer, "held_limit", held_limit)
        hold = FalconDPOTrainer._hold
        monkeypatch.setattr(FalconDPOTrainer, "_hold", lambda self, *a: hold(self, *a) or held.append(dict(self._held)))
    ours = run_dpo(base, tmp_path / "ours", *args)
    assert ours.own_step and ours._nan_filter and not ours.args.logging_nan_inf_filter
    for key in METRICS:
        _close(_history(ours, key), _history(theirs, key), key)
        if key != "grad_norm":
            _close(_history(ours, f"eval_{key}"), _history(theirs, f"eval_{key}"), f"eval_{key}")
    assert len(_history(ours, "loss")) == 4 and len(_history(ours, "eval_loss")) == 2
    assert not any(torch.is_tensor(v) for log in ours.state.log_history for v in log.values())  # read at the logs
    if held_limit:  # 11 metrics a micro-batch, never more than 7 held: read between the logs too
        assert len(held) >= 8 * 11 and max(max(h.values()) for h in held) < held_limit
    assert _history(ours, "num_tokens") == _history(theirs, "num_tokens")
    assert _history(ours, "num_tokens")[-1] > 100 and 0 < _history(ours, "mean_token_accuracy")[-1] < 1
    mine = dict(ours.model.named_parameters())
    for name, p in theirs.model.named_parameters():
        assert rel_err(mine[name].detach(), p.detach()) < 1e-4, name


@pytest.mark.parametrize(
    "flags",
    [
        ("--loss_type", "ipo"),
        ("--loss_type", "dpo_norm", "--ld_alpha", "0.5"),
        ("--loss_type", "dpo_norm", "--use_weighting", "True"),
        ("--loss_type", "dpo_norm", "--precompute_ref_log_probs", "False"),
    ],
    ids=["ipo", "ld_alpha", "weighting", "reference-model"],
)
def test_what_the_sync_free_step_does_not_cover_takes_trls(base, tmp_path, monkeypatch, flags):  # noqa: F811
    monkeypatch.setattr(dpo, "FalconDPOTrainer", partial(FalconDPOTrainer, sync_free=True))
    trainer = run_dpo(base, tmp_path / "run", "--max_steps", "1", "--learning_rate", "1e-3", *flags)
    assert not trainer.own_step and trainer.args.logging_nan_inf_filter
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    trainer._metrics["train"].clear()
    trainer.compute_loss(trainer.model.train(), batch)  # TRL's step: its metrics are floats as they are appended
    held = {name: values for name, values in trainer._metrics["train"].items() if name != "num_tokens"}
    assert len(held) >= 10 and all(isinstance(v, float) for values in held.values() for v in values), held


def test_sync_free_step_reads_nothing_back(base, tmp_path, monkeypatch):  # noqa: F811
    """A padding-free micro-batch of 8 pairs through `compute_loss` and the backward, with the varlen attention the
    CUDA path takes: TRL's step reads the device back (its metrics' `.item()`s, boolean-mask indexing), ours reads
    nothing, for the same loss. (On CUDA, TRL's fused LM head still compacts the scored positions by boolean
    indexing; on CPU it scores every position.)"""
    _varlen(monkeypatch)
    seen, losses = {}, {}
    for sync_free in (False, True):
        trainer = make_trainer(base, tmp_path / f"sync_free_{sync_free}", sync_free=sync_free)
        assert trainer.own_step == sync_free
        model = trainer.model.train()
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(8)]))
        with HostReads() as reads:
            loss = trainer.compute_loss(model, batch)
            loss.backward()
        seen[sync_free], losses[sync_free] = dict(reads.seen), loss.detach()
    assert seen[False].get("aten::_local_scalar_dense", 0) >= 13 and not seen[True], seen
    assert rel_err(losses[True], losses[False]) < 1e-6
