"""The Trainers' forward and backward read nothing back from the device: no `.item()`/`bool()` of a tensor, no
`nonzero`, no boolean-mask indexing (each waits for the GPU on CUDA, and the host then cannot queue work ahead). Seen
at the op level on CPU, with the varlen attention path the CUDA kernels take."""

import dataclasses
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from align.preference import HostUnpaddedCollator
from model import kernels
from tests.conftest import rel_err, tiny_model

READS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::repeat_interleave")


class HostReads(TorchDispatchMode):
    """Counts the ops that read a device tensor's values on the host, boolean-mask indexing included."""

    def __init__(self):
        super().__init__()
        self.seen = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        masked = name.startswith(("aten::index.", "aten::index_put")) and any(
            t is not None and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ())
        )
        if name.split(".")[0] in READS or masked:
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))


def _varlen(monkeypatch):
    monkeypatch.setitem(kernels._chosen, "cpu", dataclasses.replace(kernels.REFERENCE, varlen_for_packing=True))


def _docs(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (n,), generator=gen).tolist() for n in lengths]


def test_sft_step_on_a_padding_free_row_reads_nothing_back(monkeypatch):
    """TRL's padding-free batch as FalconSFTTrainer runs it (loss_metrics, ids checked on the host) against the plain
    forward with labels, which reads the device (the id check, the boundaries, the loss's compaction)."""
    _varlen(monkeypatch)
    model = tiny_model(seed=6).train()
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": d} for d in _docs([7, 12, 5, 9])]
    )
    losses = []
    for extra in ({}, {"loss_metrics": True, "checked_ids": True}):
        with HostReads() as reads:
            out = model(**batch, **extra)
            out.loss.backward()
        losses.append((out.loss.detach(), dict(reads.seen)))
    (plain, plain_reads), (trainer, trainer_reads) = losses
    assert plain_reads and not trainer_reads, (plain_reads, trainer_reads)
    assert rel_err(trainer, plain) < 1e-6


def test_dpo_step_on_padded_pairs_reads_nothing_back(monkeypatch):
    """A right-padded preference batch run padding-free, its real tokens located by HostUnpaddedCollator on the host:
    the forward and backward read nothing back, and the hidden states equal those found on the device."""
    _varlen(monkeypatch)
    model = tiny_model(seed=7, mamba_n_groups=2).train().set_padding_free(True)
    rows = _docs([9, 4, 13, 6], seed=3)
    width = max(map(len, rows))

    def collate(examples):
        ids = torch.tensor([r + [0] * (width - len(r)) for r in examples])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in examples])
        return {"input_ids": ids, "attention_mask": mask}

    batch = HostUnpaddedCollator(collate, vocab=97)(rows)
    assert (
        batch["checked_ids"] and batch["max_length_q"] == 13 and batch["cu_seq_lens_q"].tolist() == [0, 9, 13, 26, 32]
    )
    found = model.model(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    with HostReads() as reads:
        given = model.model(**batch).last_hidden_state
        given.square().sum().backward()
    assert not reads.seen, dict(reads.seen)
    assert rel_err(given, found.detach()) < 1e-6 and given[batch["attention_mask"] == 0].abs().max() == 0
    with HostReads() as reads:  # without the collator's help the same forward reads the mask back
        model.model(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert reads.seen
