"""Context parallelism for Falcon-H1: one packed row split over ranks, exact in all three mixers.

Rank r holds tokens [r·n, (r+1)·n) of a (1, world·n) row (documents marked by restarting `position_ids`, as
TRL's padding-free collator emits them; a document may cross any number of rank boundaries). Per layer:

- **Attention**: keys and values (GQA-small) are all-gathered; per document, this rank's queries attend to that
  document's keys up to themselves (SDPA with a lower-right causal bias: flash kernels on GPU, no row-wide mask).
  K/V of the whole row live on every rank (ring attention would bound that; the seam is
  `ContextParallelStep.attend`).
- **Conv**: a halo of the previous rank's last K−1 pre-conv activations (with their document ids) is prepended,
  so the window sees exactly what it would on one device; the halo's outputs are dropped.
- **SSM**: exact state passing. Each rank scans its chunk from a zero state → final state S_r and the chunk's
  total decay T_r = exp(A·Σdt) (0 if a document starts inside the chunk). The state entering rank r is
  h_r = T_{r−1}·h_{r−1} + S_{r−1} (reset where a document starts at the boundary); rank r then rescans with
  initial state h_r. Gradients flow back through the gathers to the ranks that produced S and T.

Every collective is an all-gather whose backward all-reduces the gradient and keeps the caller's slice, so any
torch.distributed backend works (gloo on CPU in the tests, NCCL on GPUs).

    from model.context_parallel import enable_context_parallel, shard
    enable_context_parallel(model)                       # after torch.distributed.init_process_group
    local = shard(input_ids, position_ids, labels)        # this rank's slice, labels pre-shifted globally
    loss_sum = model(**local).loss * n_local_labels       # then all-reduce losses / gradients as in DDP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .modeling import configure_backbones
from .packing import seq_idx_from_position_ids


class _GatherSeq(torch.autograd.Function):
    """All-gather along `dim`; backward: all-reduce (sum) the full gradient, keep this rank's slice."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        ctx.rank, ctx.size = dist.get_rank(group), x.size(dim)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size), None, None


def gather_seq(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    return _GatherSeq.apply(x, dim, group)


@dataclass
class ContextParallel:
    """The process group the sequence is split over (None: the default group)."""

    group: object = None

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    def step(self, position_ids: torch.Tensor) -> ContextParallelStep:
        """Per-forward context from this rank's (1, n) position_ids: global document ids and boundaries."""
        if position_ids.size(0) != 1:
            raise ValueError(f"context parallelism splits one packed row; got a batch of {position_ids.size(0)}")
        positions = gather_seq(position_ids, 1, self.group)  # (1, L) global; ints carry no gradient
        seq_idx = seq_idx_from_position_ids(positions)
        if seq_idx is None:
            seq_idx = torch.zeros_like(positions, dtype=torch.int32)
        return ContextParallelStep(self, seq_idx, position_ids.size(1))


@dataclass
class ContextParallelStep:
    cp: ContextParallel
    seq_idx_global: torch.Tensor  # (1, L) int32
    n: int  # tokens per rank

    def __post_init__(self):
        r, n = self.cp.rank, self.n
        self.start = r * n
        self.seq_idx = self.seq_idx_global[:, self.start : self.start + n]  # (1, n) global ids, for attention
        # the scan and conv kernels take ids from 0 and give an initial state to document 0 only (mamba-ssm's
        # Triton kernels zero it for any other id): this rank's first document is 0 there
        self.local_seq_idx = self.seq_idx - self.seq_idx[:, :1]
        s = self.seq_idx_global[0]
        # per rank: does its first token continue the previous rank's document? does a document start inside?
        firsts = torch.arange(self.cp.world, device=s.device) * n
        self.continues = torch.zeros(self.cp.world, dtype=torch.bool, device=s.device)
        self.continues[1:] = s[firsts[1:]] == s[firsts[1:] - 1]
        self.whole = s[firsts + n - 1] == s[firsts]  # one document spans the entire chunk
        self.segments = self._document_segments()

    # ------------------------------------------------------------------ attention
    def attend(self, q, k, v, scale, gqa: bool):
        """q (1, H, n, hd) local; k, v (1, kv, n, hd) local, rotated → (1, H, n, hd).

        Per document present here: its local queries attend to its keys from the document's start (possibly on
        an earlier rank) to the last local query, causal aligned to the lower right — flash/efficient kernels on
        GPU, O(queries × keys of that document) memory, never a mask over the whole row."""
        k, v = gather_seq(k, 2, self.cp.group), gather_seq(v, 2, self.cp.group)  # (1, kv, L, hd)
        if gqa:  # kv heads → query heads (the lower-right causal bias is not combined with enable_gqa)
            k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
            v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
        out = []
        for q_lo, q_hi, k_lo in self.segments:
            k_hi = self.start + q_hi  # keys up to the last query of this segment (global index, exclusive)
            lq, lk = q_hi - q_lo, k_hi - k_lo
            mask = causal_lower_right(lq, lk) if lq != lk else None
            out.append(
                F.scaled_dot_product_attention(
                    q[:, :, q_lo:q_hi],
                    k[:, :, k_lo:k_hi],
                    v[:, :, k_lo:k_hi],
                    attn_mask=mask,
                    is_causal=mask is None,
                    scale=scale,
                )
            )
        return torch.cat(out, dim=2)

    def _document_segments(self):
        """(local query start, local query end, global key start) for each document on this rank."""
        local, whole = self.seq_idx[0].tolist(), self.seq_idx_global[0]
        bounds = [0] + [i for i in range(1, len(local)) if local[i] != local[i - 1]] + [len(local)]
        firsts = torch.tensor([local[lo] for lo in bounds[:-1]], dtype=whole.dtype, device=whole.device)
        starts = torch.searchsorted(whole, firsts)
        return [(lo, hi, int(k)) for lo, hi, k in zip(bounds[:-1], bounds[1:], starts.tolist())]

    # ------------------------------------------------------------------ conv halo
    def conv(self, ops, xBC, weight, bias, activation="silu"):
        """xBC (1, n, C) local pre-conv → (1, n, C): the causal conv as if the whole row were here."""
        K = weight.size(-1)
        halo_len = K - 1
        if self.n < halo_len:
            raise ValueError(f"context parallelism needs ≥ {halo_len} tokens per rank for the conv halo; got {self.n}")
        # every rank runs the same graph (a collective's backward must run on all ranks, in the same order):
        # rank r takes the tails shifted by one rank, rank 0 zeros — what a causal conv sees before a row
        tails = gather_seq(xBC[:, -halo_len:], 1, self.cp.group)  # (1, world·(K−1), C)
        prev = torch.cat([torch.zeros_like(tails[:, :halo_len]), tails[:, :-halo_len]], dim=1)
        seq_tails = self.seq_idx_global.view(self.cp.world, self.n)[:, -halo_len:].reshape(1, -1)
        seq_prev = torch.cat([torch.full_like(seq_tails[:, :halo_len], -1), seq_tails[:, :-halo_len]], dim=1)
        sl = slice(self.cp.rank * halo_len, (self.cp.rank + 1) * halo_len)
        x = torch.cat([prev[:, sl], xBC], dim=1)  # (1, K−1+n, C)
        seq = torch.cat([seq_prev[:, sl] if self.cp.rank else seq_prev[:, sl].clamp(min=0), self.seq_idx], dim=1)
        seq = seq - seq[:, :1]  # ids from 0 (only equality matters to the conv)
        out = ops.causal_conv1d(x.transpose(1, 2), weight, bias, seq_idx=seq.contiguous(), activation=activation)
        return out.transpose(1, 2)[:, -self.n :]

    # ------------------------------------------------------------------ SSM state passing
    def initial_state(self, scan, x, dt, A, B, C):
        """The exact SSM state entering this rank's chunk (1, H, P, N), fp32, differentiable across ranks.
        dt is the discretized step (after softplus and clamping), (1, n, H) fp32; scan(x, dt, A, B, C, seq_idx,
        initial_states) → (y, final state) is the mixer's own (segmented for long chunks)."""
        _, final = scan(x, dt, A, B, C, self.local_seq_idx, None)
        decay = torch.exp(A.float()[None] * dt.float().sum(1))  # (1, H): the chunk's total decay
        decay = decay * self.whole[self.cp.rank].to(decay.dtype)  # a document starting inside resets the state
        finals = gather_seq(final.float()[None], 0, self.cp.group)  # (world, 1, H, P, N)
        decays = gather_seq(decay[None], 0, self.cp.group)  # (world, 1, H)
        states = [torch.zeros_like(final, dtype=torch.float32)]
        for r in range(1, self.cp.world):  # h_r = T_{r-1} h_{r-1} + S_{r-1}, reset at document starts
            h = decays[r - 1][..., None, None] * states[-1] + finals[r - 1]
            states.append(h * self.continues[r].to(h.dtype))
        return torch.stack(states)[self.cp.rank]  # the same graph on every rank (see conv)


def enable_context_parallel(model, group=None) -> ContextParallel:
    """Split every forward of the Falcon-H1 backbone(s) inside `model` (PEFT or other wrappers too) over `group`."""
    cp = ContextParallel(group)
    if not configure_backbones(model, context_parallel=cp):
        raise ValueError("context parallelism needs falcon-align's Falcon-H1 model (model.modeling.FalconH1Model)")
    return cp


def disable_context_parallel(model) -> None:
    configure_backbones(model, context_parallel=None)


def shard(input_ids, position_ids, labels=None, group=None, ignore_index=-100) -> dict:
    """This rank's slice of a (1, L) packed row, L divisible by the world size. Labels are shifted on the whole
    row first (the next token of a rank's last token lives on the next rank) and returned as `shift_labels`;
    a document's last token predicts nothing (the next position starts another document)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    L = input_ids.size(1)
    if L % world:
        raise ValueError(f"context parallelism needs a row length divisible by {world} ranks; got {L} (pad it)")
    n = L // world
    out = {
        "input_ids": input_ids[:, rank * n : (rank + 1) * n],
        "position_ids": position_ids[:, rank * n : (rank + 1) * n],
    }
    if labels is not None:
        out["shift_labels"] = next_token_targets(position_ids, labels, ignore_index)[:, rank * n : (rank + 1) * n]
    return out


def next_token_targets(position_ids, labels, ignore_index=-100):
    """(1, L) labels shifted to the token each position predicts, ignored where that token starts another
    document (or past the row's end)."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    doc_end = F.pad(position_ids[:, 1:] != position_ids[:, :-1] + 1, (0, 1), value=True)
    return shifted.masked_fill(doc_end, ignore_index)
