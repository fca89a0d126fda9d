"""Chunked linear cross-entropy: lm_head, µP logit multiplier and CE without ever building (tokens, vocab).

The forward walks the tokens in chunks; for each chunk it forms the chunk's logits, takes the loss, and
immediately turns them into the gradients for the hidden states and the head weight, so neither the
forward nor the backward holds more than one chunk of logits. Only positions with a label are scored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import IGNORE_INDEX, check_labels
from .settings import settings

# an odd vocabulary (65,537 in the 1.5B models) gives the logits an odd row stride, and cuBLAS then takes its
# align-1 kernels: 32 ms of a 375 ms 1.5B-Deep step at 8K on an H100 for GEMMs worth ~7 ms. The head is padded
# with zero rows to a multiple of this, the padded logits set to −inf (no probability, no gradient).
VOCAB_ALIGN = 64


def chunk_loss_and_grad(logits, labels, multiplier: float, vocab: int, grad: bool = True):
    """logits (n, V') = h @ Wᵀ of one chunk, the head padded past `vocab`; labels (n,) all valid →
    (summed CE over the scaled logits, fp32 or fp64 scalar; d loss / d (h @ Wᵀ) (n, V') in logits.dtype, or None).

    Softmax, log-sum-exp and the gradient are taken in fp32 (fp64 for fp64 inputs: the tests' oracle). Eagerly
    that is ~6 passes over an (n, V') fp32 tensor; a training step on CUDA runs it compiled
    (`_fused_chunk_loss_and_grad`): kernels that read the bf16 logits once for the log-sum-exp and once for the
    gradient. Without gradients (evaluation) it runs eagerly."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(acc) * multiplier  # (n, V')
    if z.size(1) != vocab:
        z[:, vocab:] = float("-inf")
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    total = (lse - z.gather(1, labels[:, None]).squeeze(1)).sum()
    if not grad:
        return total, None
    # d loss / d logits = softmax − onehot; the multiplier scales the chain back to h @ Wᵀ
    g = torch.exp(z - lse[:, None], out=z)
    g[torch.arange(labels.numel(), device=labels.device), labels] -= 1.0
    return total, (g * multiplier).to(logits.dtype)


_compiled = None  # torch.compile(chunk_loss_and_grad), built on first CUDA use


def _fused_chunk_loss_and_grad(logits, labels, multiplier, vocab):
    global _compiled
    if not logits.is_cuda or not settings().compile_loss:
        return chunk_loss_and_grad(logits, labels, multiplier, vocab)
    if _compiled is None:  # dynamic: a row's last chunk is shorter and batch lengths vary
        _compiled = torch.compile(chunk_loss_and_grad, dynamic=True)
    return _compiled(logits, labels, multiplier, vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, multiplier, chunk_size):
        # hidden (N, d); weight (V, d); labels (N,) all valid. Returns the summed loss (fp32 scalar).
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
        for start in range(0, hidden.size(0), chunk_size):
            h = hidden[start : start + chunk_size]
            y = labels[start : start + chunk_size]
            logits = h @ weight.t()  # (n, V') — one chunk only
            if not want_grad:
                total += chunk_loss_and_grad(logits, y, multiplier, vocab, grad=False)[0]
                continue
            loss, g = _fused_chunk_loss_and_grad(logits, y, multiplier, vocab)
            total += loss
            if want_h:
                grad_h[start : start + chunk_size] = g @ weight
            if want_w:
                grad_w += (g.t() @ h).to(acc)
        ctx.save_for_backward(grad_h if want_h else None, grad_w[:vocab] if want_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


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
    total = _LinearCrossEntropy.apply(h, weight, scored, float(multiplier), chunk_size)
    if num_items_in_batch is not None:
        denom = torch.as_tensor(num_items_in_batch, device=total.device, dtype=total.dtype)
    else:
        denom = keep.sum().clamp(min=1).to(total.dtype)
    return total / denom
