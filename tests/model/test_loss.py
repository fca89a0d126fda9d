"""Chunked linear cross-entropy: same value and gradients as full CE on the scaled logits, no full logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from model.loss import chunked_causal_lm_loss
from tests.conftest import tiny_model


def full_ce(hidden, weight, labels, mult):
    logits = (hidden @ weight.t()).float() * mult
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)


def _case(seed=0, b=3, l=40, d=16, v=300):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, l, d, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (b, l), generator=gen)
    labels[0, :10] = -100
    labels[2, 30:] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("vocab", [300, 320])  # 300: the head padded to a multiple of 64 rows (odd vocabularies)
def test_chunked_ce_equals_full_ce_value_and_grads(vocab):
    hidden, weight, labels = _case(v=vocab)
    ref = full_ce(hidden, weight, labels, 0.37)
    g_ref = torch.autograd.grad(ref, (hidden, weight))
    got = chunked_causal_lm_loss(hidden, weight, labels, 0.37, chunk_size=7)
    g_got = torch.autograd.grad(got, (hidden, weight))
    assert abs(got.item() - ref.item()) < 1e-6
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_fp32_model_loss_equals_full_ce_within_1e6():
    model = tiny_model(seed=1)
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, labels=ids, return_logits=True)
        ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert abs(out.loss.item() - ref.item()) < 1e-6


def test_num_items_in_batch_and_shift_labels():
    hidden, weight, labels = _case(seed=2)
    n = int((labels[:, 1:] != -100).sum())
    mean = chunked_causal_lm_loss(hidden, weight, labels, 1.0)
    summed = chunked_causal_lm_loss(hidden, weight, labels, 1.0, num_items_in_batch=2 * n)
    assert abs(summed.item() * 2 - mean.item()) < 1e-9
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    assert abs(chunked_causal_lm_loss(hidden, weight, shift_labels=shifted).item() - mean.item()) < 1e-12


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_loss_never_builds_the_full_logits():
    """Every tensor made in forward+backward stays under one chunk of logits, far below tokens × vocab."""
    vocab, tokens, chunk = 5000, 2 * 600, 128
    hidden = torch.randn(2, 600, 8, requires_grad=True)
    weight = torch.randn(vocab, 8, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 600))
    with _LargestTensor() as spy:
        chunked_causal_lm_loss(hidden, weight, labels, 0.5, chunk_size=chunk).backward()
    assert spy.largest <= chunk * vocab < tokens * vocab // 4
    with _LargestTensor() as spy_full:
        full_ce(hidden, weight, labels, 0.5).backward()
    assert spy_full.largest >= tokens * vocab * 0.99  # the spy does see a full logits tensor when one is built


def test_model_forward_with_labels_returns_no_logits_by_default():
    model = tiny_model(seed=3)
    ids = torch.randint(0, 97, (1, 12))
    out = model(ids, labels=ids)
    assert out.logits is None and out.loss.requires_grad


@pytest.mark.parametrize("vocab", [300, 320])
def test_chunk_loss_traces_under_torch_compile(vocab):
    """The CUDA path compiles `chunk_loss_and_grad` (dynamic shapes); traced (aot_eager, CPU) it gives the eager
    loss and gradient for a padded and an unpadded head, and for a second chunk length without recompiling wrong."""
    from model.loss import chunk_loss_and_grad

    compiled = torch.compile(chunk_loss_and_grad, dynamic=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(3)
    for n in (7, 4):
        logits = torch.randn(n, 320, generator=gen, dtype=torch.bfloat16)
        labels = torch.randint(0, vocab, (n,), generator=gen)
        loss, grad = compiled(logits, labels, 0.37, vocab)
        ref_loss, ref_grad = chunk_loss_and_grad(logits, labels, 0.37, vocab)
        full = F.cross_entropy(logits.float()[:, :vocab] * 0.37, labels, reduction="sum")
        assert abs(loss.item() - full.item()) < 1e-4 and abs(ref_loss.item() - full.item()) < 1e-4
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)
        assert grad[:, vocab:].abs().max() == 0 if vocab < 320 else True


@pytest.mark.parametrize("label", [300, 319, 1000, -1, -101])  # 300–319 sit in the head's padding to 320 rows
def test_labels_outside_the_vocabulary_are_refused_by_name(label):
    """Without the check, 300–319 give loss = inf with finite gradients and the others an IndexError."""
    hidden, weight, labels = _case(v=300)
    labels[1, 5] = label
    with pytest.raises(
        ValueError, match=rf"labels hold 1 token id\(s\) outside the vocabulary \[0, 300\).*\[{label}\]"
    ):
        chunked_causal_lm_loss(hidden, weight, labels, 1.0)


@pytest.mark.parametrize("token", [97, 5000, -3])
def test_input_ids_outside_the_vocabulary_are_refused_by_name(token):
    model = tiny_model(seed=0)  # vocabulary of 97
    ids = torch.randint(0, 97, (2, 9))
    ids[1, 4] = token
    with pytest.raises(
        ValueError, match=rf"input_ids hold 1 token id\(s\) outside the vocabulary \[0, 97\).*\[{token}\]"
    ):
        model(ids)
