"""FalconSFTTrainer: the SFT step without host reads of the device trains and logs as TRL's own step does."""

from functools import partial

import pytest
import torch
from trl import SFTTrainer

from align import sft
from align.sft_trainer import FalconSFTTrainer, HostCheckedCollator
from tests.align.test_sft import base, run_sft  # noqa: F401  (base: the module's tiny checkpoint and data mix)
from tests.conftest import rel_err

STEPS = ("--max_steps", "6", "--learning_rate", "2e-2", "--gradient_accumulation_steps", "2")
STEPS += ("--include_num_input_tokens_seen", "true")  # "all"
STEPS += ("--eval_fraction", "0.2", "--eval_strategy", "steps", "--eval_steps", "3")


def _logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h and "train_loss" not in h]


@pytest.mark.parametrize("packing", ["True", "False"])
def test_falcon_step_trains_and_logs_as_trls(base, tmp_path, monkeypatch, packing):  # noqa: F811
    """Same loss, gradient norm, entropy, top-1 accuracy and token count at every log, the same evaluation figures,
    and the same weights after 6 steps of 2 micro-batches, packed (padding-free) and padded, with the prompt tokens
    unscored: the CUDA step (sync_free, taken here on CPU) against TRL's, which the CPU default runs."""
    theirs = run_sft(base, tmp_path / "trl", *STEPS, "--packing", packing)
    assert type(theirs) is FalconSFTTrainer and not theirs.own_step  # on CPU: TRL's step
    monkeypatch.setattr(sft, "FalconSFTTrainer", partial(FalconSFTTrainer, sync_free=True))
    ours = run_sft(base, tmp_path / "ours", *STEPS, "--packing", packing)
    assert type(ours) is FalconSFTTrainer and ours.own_step
    assert isinstance(ours.data_collator, HostCheckedCollator)
    for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy"):
        got, want = _logged(ours, key), _logged(theirs, key)
        assert len(got) == len(want) == 6, key
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, want)), (key, got, want)
    for key in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy"):  # evaluation at steps 3 and 6
        got, want = _logged(ours, key), _logged(theirs, key)
        assert len(got) == len(want) == 2 and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, want)), key
    assert _logged(ours, "eval_num_tokens") == _logged(theirs, "eval_num_tokens") == _logged(ours, "num_tokens")[2::3]
    assert _logged(ours, "num_tokens") == _logged(theirs, "num_tokens")
    assert ours.state.num_input_tokens_seen == theirs.state.num_input_tokens_seen > 0
    assert 0.05 < _logged(ours, "mean_token_accuracy")[-1] < 1  # learning: the top-1 count is no constant 0
    # fp32 sums in another order in the two heads; Adam's normalised steps carry that to ~5e-5 of a weight in 6 steps
    mine = dict(ours.model.named_parameters())
    for name, p in theirs.model.named_parameters():
        assert rel_err(mine[name].detach(), p.detach()) < 5e-4, name


def test_non_finite_loss_counts_as_the_mean_since_the_last_log(base, tmp_path, monkeypatch):  # noqa: F811
    """The Trainer's NaN filter, on the device: a finite loss passes; a NaN or inf one becomes the mean of the losses
    summed since the last log, as the Trainer's host-side filter makes it (which then stays off)."""
    monkeypatch.setattr(sft, "FalconSFTTrainer", partial(FalconSFTTrainer, sync_free=True))
    trainer = run_sft(base, tmp_path / "run", "--max_steps", "1")
    assert trainer._nan_filter and not trainer.args.logging_nan_inf_filter
    trainer._tr_loss = torch.tensor(6.0)
    trainer.state.global_step, trainer._globalstep_last_logged = 5, 3  # 3 micro-batches summed
    for value, want in ((1.5, 1.5), (float("nan"), 2.0), (float("inf"), 2.0)):
        monkeypatch.setattr(SFTTrainer, "training_step", lambda self, *a, v=value, **k: torch.tensor(v))
        assert trainer.training_step(trainer.model, {}).item() == want


@pytest.mark.parametrize("field, value", [("input_ids", 400), ("labels", 401), ("input_ids", -2)])
def test_token_ids_outside_the_vocabulary_are_refused_on_the_host(field, value):
    def collate(rows):
        ids = torch.tensor([rows])
        return {"input_ids": ids.clone(), "labels": ids.clone()}

    batch = HostCheckedCollator(collate, vocab=400)([5, 7, 9])
    assert batch["input_ids"].tolist() == [[5, 7, 9]]

    def bad(rows):
        batch = collate(rows)
        batch[field][0, 1] = value
        return batch

    with pytest.raises(
        ValueError, match=rf"{field} hold 1 token id\(s\) outside the vocabulary \[0, 400\).*\[{value}\]"
    ):
        HostCheckedCollator(bad, vocab=400)([5, 7, 9])
    batch = collate([5, 7, 9])
    batch["labels"][0, 0] = -100  # the ignore index is no token
    HostCheckedCollator(lambda rows: batch, vocab=400)([5, 7, 9])
