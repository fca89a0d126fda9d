"""Chunked linear cross-entropy: lm_head, µP logit multiplier and CE without ever building (tokens, vocab).

The forward walks the tokens in chunks; for each chunk it forms the chunk's logits, takes the loss, and
immediately turns them into the gradients for the hidden states and the head weight, so neither the
forward nor the backward holds more than one chunk of logits. Only positions with a label are scored: dropped
from the chunks (`chunked_causal_lm_loss`, one host sync), or weighted by zero in place, with the token metrics a
trainer logs (`causal_lm_loss_and_metrics`, no sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import IGNORE_INDEX, check_labels
from .settings import settings

# an odd vocabulary (65,537 in the 1.5B models) gives the logits an odd row stride, and cuBLAS then takes its
# align-1 kernels: 32 ms of a 375 ms 1.5B-Deep step at 8K on an H100 for GEMMs worth ~7 ms. The head is padded
# with zero rows to a multiple of this, the padded logits set to −inf (no probability, no gradient).
VOCAB_ALIGN = 64


def chunk_loss_and_grad(logits, labels, multiplier: float, vocab: int, grad: bool = True, metrics: bool = False):
    """logits (n, V') = h @ Wᵀ of one chunk, the head padded past `vocab`; labels (n,), IGNORE_INDEX where a row is
    not scored → (summed CE over the scaled logits, fp32 or fp64 scalar; d loss / d (h @ Wᵀ) (n, V') in
    logits.dtype, zero on unscored rows, or None; with `metrics`, the summed entropy of the predicted distribution
    and the count of rows whose label is the first argmax, both over scored rows, else None, None).

    Softmax, log-sum-exp and the gradient are taken in fp32 (fp64 for fp64 inputs: the tests' oracle). Eagerly
    that is ~6 passes over an (n, V') fp32 tensor; a training step on CUDA runs it compiled
    (`_fused_chunk_loss_and_grad`): kernels that read the bf16 logits once for the log-sum-exp and once for the
    gradient. Without gradients (evaluation) it runs eagerly."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    scored = labels != IGNORE_INDEX
    weight = scored.to(acc)  # (n,) 1 on scored rows: masking by weight needs no boolean indexing (no host sync)
    target = labels.clamp(min=0)[:, None]  # (n, 1) an ignored row's label reads column 0, then weighs 0
    z = logits.to(acc) * multiplier  # (n, V')
    if z.size(1) != vocab:
        z[:, vocab:] = float("-inf")
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    total = ((lse - z.gather(1, target).squeeze(1)) * weight).sum()
    entropy = hits = None
    if metrics:
        hits = ((z.argmax(dim=-1) == target.squeeze(1)) & scored).sum()
    if not grad and not metrics:
        return total, None, None, None
    # (n, V') softmax, −inf columns → 0; written over z unless the entropy still reads z
    p = torch.exp(z - lse[:, None]) if metrics else torch.exp(z - lse[:, None], out=z)
    if metrics:  # H = lse − Σ p·z over the real vocabulary (the padded columns hold p = 0, z = −inf)
        entropy = ((lse - (p[:, :vocab] * z[:, :vocab]).sum(dim=-1)) * weight).sum()
    if not grad:
        return total, None, entropy, hits
    # d loss / d logits = softmax − onehot on scored rows; the multiplier scales the chain back to h @ Wᵀ
    p.scatter_add_(1, target, -torch.ones_like(weight)[:, None])
    return total, (p * (weight * multiplier)[:, None]).to(logits.dtype), entropy, hits


_compiled = None  # torch.compile(chunk_loss_and_grad), built on first CUDA use


def _fused_chunk_loss_and_grad(logits, labels, multiplier, vocab, metrics):
    global _compiled
    if not logits.is_cuda or not settings().compile_loss:
        return chunk_loss_and_grad(logits, labels, multiplier, vocab, metrics=metrics)
    if _compiled is None:  # dynamic: a row's last chunk is shorter and batch lengths vary
        _compiled = torch.compile(chunk_loss_and_grad, dynamic=True)
    return _compiled(logits, labels, multiplier, vocab, metrics=metrics)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, multiplier, chunk_size, metrics=False):
        # hidden (N, d); weight (V, d); labels (N,), IGNORE_INDEX on unscored rows → (summed loss, fp32 scalar;
        # with `metrics`, summed entropy and top-1 hits over scored rows, no gradient, else None, None)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        vocab = weight.size(0)
        if vocab % 8:
            weight = F.pad(weight, (0, 0, 0, -vocab % VOCAB_ALIGN))  # (V', d), zero rows past the vocabulary
        acc = torch.promote_types(hidden.dtype, torch.float32)
        want_grad = want_h or want_w
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        total = hidden.new_zeros((), dtype=acc)
        entropy = hidden.new_zeros((), dtype=acc) if metrics else None
        hits = torch.zeros((), dtype=torch.long, device=hidden.device) if metrics else None
        for start in range(0, hidden.size(0), chunk_size):
            h = hidden[start : start + chunk_size]
            y = labels[start : start + chunk_size]
            logits = h @ weight.t()  # (n, V') — one chunk only
            if want_grad:
                loss, g, ent, hit = _fused_chunk_loss_and_grad(logits, y, multiplier, vocab, metrics)
            else:
                loss, g, ent, hit = chunk_loss_and_grad(logits, y, multiplier, vocab, grad=False, metrics=metrics)
            total += loss
            if metrics:
                entropy += ent
                hits += hit
            if want_h:
                grad_h[start : start + chunk_size] = g @ weight
            if want_w:
                grad_w += (g.t() @ h).to(acc)
        ctx.save_for_backward(grad_h if want_h else None, grad_w[:vocab] if want_w else None)
        if metrics:
            ctx.mark_non_differentiable(entropy, hits)
        return total, entropy, hits

    @staticmethod
    def backward(ctx, grad_out, *_metrics):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def shift_for_next_token(labels: torch.Tensor) -> torch.Tensor:
    """labels (b, l) aligned with input_ids → targets (b, l): position t predicts labels[t+1]; last is ignored."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def chunked_causal_lm_loss(
    hidden, weight, labels=None, multiplier=1.0, *, shift_labels=None, num_items_in_batch=None, chunk_size=4096
):
    """hidden (b, l, d) final-norm outputs; weight (V, d) the lm_head; labels (b, l) with -100 ignored, or
    pre-shifted `shift_labels`. Mean over scored tokens, or sum / num_items_in_batch (gradient accumulation)."""
    targets = shift_labels if shift_labels is not None else shift_for_next_token(labels)
    targets = targets.to(hidden.device).reshape(-1)
    keep = targets != IGNORE_INDEX
    h = hidden.reshape(-1, hidden.size(-1))[keep]
    scored = targets[keep]
    check_labels(scored, weight.size(0))  # the boolean indexing above has already waited for the device
    total = _LinearCrossEntropy.apply(h, weight, scored, float(multiplier), chunk_size)[0]
    return total / _denominator(total, keep, num_items_in_batch)


def _denominator(total, keep, num_items_in_batch):
    if num_items_in_batch is not None:
        return torch.as_tensor(num_items_in_batch, device=total.device, dtype=total.dtype)
    return keep.sum().clamp(min=1).to(total.dtype)


@dataclass
class TokenMetrics:
    """Sums over one forward's scored tokens, on the device (reading them waits for it): how many were scored, their
    summed entropy of the predicted distribution (nats), and how many had the label as the first argmax."""

    scored: torch.Tensor
    entropy: torch.Tensor
    hits: torch.Tensor


def causal_lm_loss_and_metrics(
    hidden, weight, labels=None, multiplier=1.0, *, shift_labels=None, num_items_in_batch=None, chunk_size=4096
) -> tuple[torch.Tensor, TokenMetrics]:
    """`chunked_causal_lm_loss`'s loss, and the token metrics a trainer logs, with no host sync: every position is
    run through the head, unscored ones weighted by zero, where that loss drops them by boolean indexing (which
    waits for the device). The labels' range is not checked here: the caller checks them on the host."""
    targets = shift_labels if shift_labels is not None else shift_for_next_token(labels)
    targets = targets.to(hidden.device).reshape(-1)
    keep = targets != IGNORE_INDEX
    h = hidden.reshape(-1, hidden.size(-1))
    total, entropy, hits = _LinearCrossEntropy.apply(h, weight, targets, float(multiplier), chunk_size, True)
    return total / _denominator(total, keep, num_items_in_batch), TokenMetrics(keep.sum(), entropy, hits)
