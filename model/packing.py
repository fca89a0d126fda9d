"""Document boundaries for packed / padding-free rows, and the attention masks they imply.

TRL's padding-free collator emits `position_ids` restarting at 0 per document, `cu_seq_lens_q/k`,
`max_length_q/k` and `seq_idx`. All of them are turned into one `seq_idx` (b, l), a non-decreasing document
index per token, which then reaches the SSM scan, the conv and attention alike.
"""

from __future__ import annotations

import torch


def seq_idx_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """(b, l) positions → (b, l) int32 document index; a new document starts where the position does not
    continue the previous one (TRL restarts at 0). None when every row is a single document."""
    if position_ids.size(-1) < 2:
        return None
    starts = position_ids[:, 1:] != position_ids[:, :-1] + 1  # (b, l-1)
    if not bool(starts.any()):
        return None
    starts = torch.cat([torch.zeros_like(starts[:, :1]), starts], dim=1)
    return starts.cumsum(-1).to(torch.int32)


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """Flattened batch-1 layout: cu_seqlens (docs+1,) → (1, length) int32 document index."""
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    idx = torch.repeat_interleave(torch.arange(counts.numel(), device=cu_seqlens.device), counts)
    if idx.numel() < length:  # trailing padding forms its own document
        idx = torch.cat([idx, idx.new_full((length - idx.numel(),), counts.numel())])
    return idx[:length].to(torch.int32)[None]


def resolve_seq_idx(position_ids, seq_idx=None, cu_seq_lens_q=None, length=None) -> torch.Tensor | None:
    if seq_idx is not None:
        return seq_idx.to(torch.int32)
    if cu_seq_lens_q is not None and cu_seq_lens_q.numel() > 2:
        return seq_idx_from_cu_seqlens(cu_seq_lens_q, length)
    if position_ids is not None:
        return seq_idx_from_position_ids(position_ids)
    return None


def positions_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding shifts no real token: positions count only attended tokens (pads get 0)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


def cu_seqlens_from_seq_idx(seq_idx: torch.Tensor) -> tuple[torch.Tensor, int]:
    """seq_idx (b, l) → cumulative document starts over the flattened b·l tokens (int32) and the longest
    document. Documents never span rows: a new row always starts a new document."""
    b, l = seq_idx.shape
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    positions = torch.nonzero(starts.reshape(-1)).squeeze(1)
    cu = torch.cat([positions, positions.new_tensor([b * l])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def build_attention_mask(batch: int, q_len: int, past_len: int, device, attention_mask=None, seq_idx=None):
    """Boolean (b, 1, q_len, past_len+q_len) mask (True = may attend), or None when plain causal suffices.

    Combines causality (query i sits at absolute position past_len+i), key padding from the 2D
    `attention_mask` over all past+current positions, and document isolation from `seq_idx` (the dense
    alternative to varlen attention, cheaper on CPU for short rows). A query whose row would be empty (a pad
    in left padding) attends to itself only, so softmax never sees an empty row.
    """
    has_padding = attention_mask is not None and not bool(attention_mask.all())
    if not has_padding and seq_idx is None and (past_len == 0 or q_len == 1):
        return None
    k_len = past_len + q_len
    q_pos = torch.arange(past_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None].expand(batch, 1, q_len, k_len)
    if has_padding:
        mask = mask & attention_mask[:, None, None, -k_len:].bool()
    if seq_idx is not None:
        mask = mask & (seq_idx[:, None, :, None] == seq_idx[:, None, None, :])
    empty = ~mask.any(-1, keepdim=True)
    if bool(empty.any()):
        mask = mask | (empty & (k_pos == q_pos))
    return mask
