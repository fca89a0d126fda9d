"""Chunked linear cross-entropy: same value and gradients as full CE on the scaled logits, no full logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from model.loss import causal_lm_loss_and_metrics, chunked_causal_lm_loss
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
        loss, grad, _, _ = compiled(logits, labels, 0.37, vocab)
        ref_loss, ref_grad, _, _ = chunk_loss_and_grad(logits, labels, 0.37, vocab)
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


def _full_metrics(hidden, weight, labels, mult):
    """Scored tokens, summed entropy and top-1 hits from the full fp64 logits."""
    logits = (hidden.detach() @ weight.detach().t()).double() * mult
    z, y = logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)
    keep = y != -100
    logp = z[keep].log_softmax(-1)
    return int(keep.sum()), float(-(logp.exp() * logp).sum()), int((z[keep].argmax(-1) == y[keep]).sum())


def _case_with_hits(vocab, mult=0.37):
    """_case, with every third scored label set to its position's argmax: the top-1 count is far from 0."""
    hidden, weight, labels = _case(v=vocab)
    best = (hidden.detach() @ weight.detach().t())[:, :-1].argmax(-1)  # (b, l-1) predicts labels[:, 1:]
    targets = labels[:, 1:]
    pick = (targets != -100) & (torch.arange(targets.numel()).view_as(targets) % 3 == 0)
    targets[pick] = best[pick]
    return hidden, weight, labels


@pytest.mark.parametrize("vocab", [300, 320])
def test_loss_with_metrics_equals_the_compacted_loss_and_the_full_logits_metrics(vocab):
    """Scoring every position in place (unscored ones weighted by zero) gives the compacted loss and its gradients,
    and the entropy and top-1 count of the full logits over the scored tokens (fp64)."""
    hidden, weight, labels = _case_with_hits(vocab)
    ref = chunked_causal_lm_loss(hidden, weight, labels, 0.37, chunk_size=7)
    g_ref = torch.autograd.grad(ref, (hidden, weight))
    got, metrics = causal_lm_loss_and_metrics(hidden, weight, labels, 0.37, chunk_size=7)
    g_got = torch.autograd.grad(got, (hidden, weight))
    assert abs(got.item() - ref.item()) < 1e-12
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    scored, entropy, hits = _full_metrics(hidden, weight, labels, 0.37)
    assert metrics.scored.item() == scored and metrics.hits.item() == hits and hits >= scored // 3
    assert abs(metrics.entropy.item() - entropy) < 1e-9 * scored
    with torch.no_grad():  # evaluation: the same loss and metrics without gradients
        loss, again = causal_lm_loss_and_metrics(hidden, weight, labels, 0.37, num_items_in_batch=2 * scored)
    assert abs(loss.item() * 2 - ref.item()) < 1e-12
    assert (again.scored.item(), again.hits.item()) == (scored, hits) and abs(again.entropy.item() - entropy) < 1e-9


@pytest.mark.parametrize("vocab", [300, 320])
def test_chunk_metrics_trace_under_torch_compile_with_unscored_rows(vocab):
    from model.loss import chunk_loss_and_grad

    compiled = torch.compile(chunk_loss_and_grad, dynamic=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 320, generator=gen, dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (9,), generator=gen)
    labels[[1, 4]] = -100
    labels[2] = logits[2, :vocab].float().argmax()
    got = compiled(logits, labels, 0.37, vocab, metrics=True)
    ref = chunk_loss_and_grad(logits, labels, 0.37, vocab, metrics=True)
    keep = labels != -100
    z = logits.float()[:, :vocab] * 0.37
    logp = z[keep].log_softmax(-1)
    assert abs(ref[0].item() - F.cross_entropy(z, labels, reduction="sum").item()) < 1e-3
    assert abs(ref[2].item() - float(-(logp.exp() * logp).sum())) < 1e-3
    assert ref[3].item() == int((z[keep].argmax(-1) == labels[keep]).sum()) >= 1
    assert ref[1][~keep].abs().max() == 0
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_model_forward_with_loss_metrics_returns_the_same_loss():
    model = tiny_model(seed=2)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :8] = -100
    plain = model(ids, labels=labels).loss
    out = model(ids, labels=labels, loss_metrics=True, checked_ids=True)
    assert abs(out.loss.item() - plain.item()) < 1e-6 and out.loss.requires_grad
    assert out.token_metrics.scored.item() == 12 + 19 and 0 < out.token_metrics.entropy.item() / 31 < 4.58  # ln 97
