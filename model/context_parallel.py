"""Context parallelism for Falcon-H1: one packed row split over ranks, exact in all three mixers.

Layout (load-balanced for causal attention): the (1, L) row is cut into 2·W chunks of m = L / 2W tokens; rank r
holds chunks r and 2W−1−r, in that order (its local row is 2m tokens). Causal attention work grows with a
chunk's position, so every rank gets one early and one late chunk: equal work, where a contiguous split gives the
last rank 2W−1 times the first's. Documents (marked by restarting `position_ids`, as TRL's padding-free collator
emits them) may cross any number of chunk boundaries. Per layer:

- **Attention**: keys and values (GQA-small) are all-gathered and put back in row order; per document, each local
  chunk's queries attend to that document's keys up to themselves (SDPA with a lower-right causal bias: flash
  kernels on GPU, no row-wide mask). K/V of the whole row live on every rank (ring attention would bound that;
  the seam is `ContextParallelStep.attend`).
- **Conv**: each chunk gets a halo of the K−1 pre-conv activations (with their document ids) that precede it in
  the row, from whichever rank holds them, so the window sees exactly what it would on one device.
- **SSM**: exact state passing. Each chunk is scanned from a zero state → final state S_c and total decay
  T_c = exp(A·Σdt) (0 if a document starts inside the chunk); all are gathered; the state entering chunk c is
  h_c = T_{c−1}·h_{c−1} + S_{c−1} (0 where a document starts at the seam); each chunk is rescanned from h_c.
  Gradients flow back through the gathers to the ranks that produced S and T.

Every collective is an all-gather whose backward all-reduces the gradient and keeps the caller's slice, so any
torch.distributed backend works (gloo on CPU in the tests, NCCL on GPUs).

    from model.context_parallel import enable_context_parallel, shard
    enable_context_parallel(model)                       # after torch.distributed.init_process_group
    local = shard(input_ids, position_ids, labels)        # this rank's two chunks, labels pre-shifted on the row
    loss_sum = model(**local).loss * n_local_labels       # then all-reduce losses / gradients as in DDP
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

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


def chunks_of(rank: int, world: int) -> tuple[int, int]:
    """The two chunks (of 2·world) that `rank` holds: one early, one late."""
    return rank, 2 * world - 1 - rank


def row_multiple(world: int) -> int:
    """A context-parallel row's length must be a multiple of this (2 chunks per rank)."""
    return 2 * world


def local_index(length: int, world: int, rank: int, device=None) -> torch.Tensor:
    """Row positions of `rank`'s local tokens, in local order: (2m,)."""
    m = length // (2 * world)
    return torch.cat([torch.arange(c * m, (c + 1) * m, device=device) for c in chunks_of(rank, world)])


def _row_order(world: int, per_chunk: int, device) -> torch.Tensor:
    """Index into an all-gather of every rank's local sequence (rank by rank, chunk a then b) that lists its
    entries in row order. per_chunk: entries per chunk (m tokens, or K−1 tail rows, or 1 state)."""
    owner_slot = [(c, 0) if c < world else (2 * world - 1 - c, 1) for c in range(2 * world)]
    return torch.cat([torch.arange(per_chunk, device=device) + (r * 2 + j) * per_chunk for r, j in owner_slot])


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

    def default_positions(self, n: int, device) -> torch.Tensor:
        """(1, n) position_ids of this rank's tokens when the row is one document."""
        return local_index(n * self.world, self.world, self.rank, device)[None]

    def step(self, position_ids: torch.Tensor) -> ContextParallelStep:
        """Per-forward context from this rank's (1, 2m) position_ids: global document ids and boundaries."""
        if position_ids.size(0) != 1:
            raise ValueError(f"context parallelism splits one packed row; got a batch of {position_ids.size(0)}")
        if position_ids.size(1) % 2:
            raise ValueError(f"a rank holds two equal chunks; got {position_ids.size(1)} tokens (use shard())")
        m = position_ids.size(1) // 2
        gathered = gather_seq(position_ids, 1, self.group)  # (1, L) rank by rank; ints carry no gradient
        positions = gathered[:, _row_order(self.world, m, gathered.device)]  # (1, L) in row order
        seq_idx = seq_idx_from_position_ids(positions)
        if seq_idx is None:
            seq_idx = torch.zeros_like(positions, dtype=torch.int32)
        return ContextParallelStep(self, seq_idx, m)


@dataclass
class ContextParallelStep:
    cp: ContextParallel
    seq_idx_global: torch.Tensor  # (1, L) int32, row order
    m: int  # tokens per chunk; this rank holds 2 chunks

    def __post_init__(self):
        W, m = self.cp.world, self.m
        self._orders = {}  # per_chunk → _row_order index, built once per forward and shared by every layer
        self.chunks = chunks_of(self.cp.rank, W)  # (a, b), row chunk numbers
        self.starts = [c * m for c in self.chunks]  # their row offsets
        s = self.seq_idx_global[0]
        self.seq_idx = torch.cat([s[st : st + m] for st in self.starts])[None]  # (1, 2m) global ids, local order
        # the scan and conv kernels take ids from 0 and give an initial state to document 0 only (mamba-ssm's
        # Triton kernels zero it for any other id): each chunk's first document is 0 there
        self.chunk_seq_idx = [ids - ids[:, :1] for ids in self.seq_idx.split(m, dim=1)]
        firsts = torch.arange(2 * W, device=s.device) * m
        # per chunk of the row: does its first token continue the previous chunk's document? one document whole?
        self.continues = torch.zeros(2 * W, dtype=torch.bool, device=s.device)
        self.continues[1:] = s[firsts[1:]] == s[firsts[1:] - 1]
        self.whole = s[firsts + m - 1] == s[firsts]
        self.segments = self._document_segments()

    def order(self, per_chunk: int) -> torch.Tensor:
        """`_row_order` for this step's ranks and device (per_chunk: m tokens, K−1 tail rows or 1 state)."""
        if per_chunk not in self._orders:
            self._orders[per_chunk] = _row_order(self.cp.world, per_chunk, self.seq_idx_global.device)
        return self._orders[per_chunk]

    # ------------------------------------------------------------------ attention
    def attend(self, q, k, v, scale, gqa: bool):
        """q (1, H, 2m, hd) local; k, v (1, kv, 2m, hd) local, rotated → (1, H, 2m, hd).

        Per document in each local chunk: its queries attend to its keys from the document's start (possibly on
        another rank) to the last of those queries, causal aligned to the lower right — flash/efficient kernels
        on GPU, O(queries × keys of that document) memory, never a mask over the whole row."""
        order = self.order(self.m)
        k = gather_seq(k, 2, self.cp.group)[:, :, order]  # (1, kv, L, hd) in row order
        v = gather_seq(v, 2, self.cp.group)[:, :, order]
        group = q.size(1) // k.size(1) if gqa else 1
        out = []
        for q_lo, q_hi, row_lo, k_lo in self.segments:
            k_hi = row_lo + (q_hi - q_lo)  # keys up to the segment's last query (row index, exclusive)
            lq, lk = q_hi - q_lo, k_hi - k_lo
            mask = causal_lower_right(lq, lk) if lq != lk else None
            qs, ks, vs = q[:, :, q_lo:q_hi], k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi]
            out.append(_attend_segment(qs, ks, vs, mask, scale, group))
        return torch.cat(out, dim=2)

    def _document_segments(self):
        """(local query start, local query end, row index of the first query, row index of the document's first
        key) for each document piece in each local chunk."""
        whole, m = self.seq_idx_global[0], self.m
        out = []
        for j, (ids, row_start) in enumerate(zip(self.seq_idx[0].split(m), self.starts)):
            cuts = (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist()  # where a document starts inside
            bounds = [0, *cuts, m]
            starts = torch.searchsorted(whole, ids[bounds[:-1]]).tolist()  # row index of each document's first key
            for lo, hi, k in zip(bounds[:-1], bounds[1:], starts):
                out.append((j * m + lo, j * m + hi, row_start + lo, k))
        return out

    # ------------------------------------------------------------------ conv halo
    def conv(self, ops, xBC, weight, bias, activation="silu"):
        """xBC (1, 2m, C) local pre-conv → (1, 2m, C): the causal conv as if the whole row were here."""
        h, m, W = weight.size(-1) - 1, self.m, self.cp.world
        if m < h:
            raise ValueError(f"context parallelism needs ≥ {h} tokens per chunk for the conv halo; got {m}")
        # every rank runs the same graph (a collective's backward must run on all ranks, in the same order):
        # block c of `prev` is what precedes chunk c — chunk c−1's tail, zeros before the row as a causal conv sees
        tails = torch.cat([xBC[:, m - h : m], xBC[:, 2 * m - h :]], dim=1)  # (1, 2h, C): each chunk's last h rows
        tails = gather_seq(tails, 1, self.cp.group)[:, self.order(h)]  # (1, 2W·h, C), chunk order
        prev = torch.cat([torch.zeros_like(tails[:, :h]), tails[:, :-h]], dim=1)
        s = self.seq_idx_global.reshape(2 * W, m)[:, -h:].reshape(1, -1)  # ids of those tails, chunk order
        prev_ids = torch.cat([self.seq_idx_global[:, :1].expand(1, h), s[:, :-h]], dim=1)  # zeros: the first id
        pieces, ids = [], []
        for j, c in enumerate(self.chunks):
            pieces += [prev[:, c * h : (c + 1) * h], xBC[:, j * m : (j + 1) * m]]
            ids += [prev_ids[:, c * h : (c + 1) * h], self.seq_idx[:, j * m : (j + 1) * m]]
        # one call over [halo a, chunk a, halo b, chunk b]: chunk b's window reaches back into its own halo only
        x, seq = torch.cat(pieces, dim=1), torch.cat(ids, dim=1)
        seq = (seq - seq[:, :1]).to(torch.int32).contiguous()  # ids from 0 (only equality matters to the conv)
        out = ops.causal_conv1d(x.transpose(1, 2), weight, bias, seq_idx=seq, activation=activation).transpose(1, 2)
        return torch.cat([out[:, h : h + m], out[:, 2 * h + m :]], dim=1)

    # ------------------------------------------------------------------ SSM state passing
    def ssm(self, scan, x, dt, A, B, C):
        """The exact scan of this rank's two chunks → y (1, 2m, H, P). scan(x, dt, A, B, C, seq_idx,
        initial_states) → (y, final state (1, H, P, N)) is the mixer's own (segmented for long chunks); dt is the
        discretized step (1, 2m, H) fp32."""
        W, m = self.cp.world, self.m
        parts = [tuple(t[:, j * m : (j + 1) * m] for t in (x, dt, B, C)) for j in range(2)]
        finals, decays = [], []
        for j, (xj, dtj, Bj, Cj) in enumerate(parts):  # from a zero state: what each chunk adds, how it decays
            _, final = scan(xj, dtj, A, Bj, Cj, self.chunk_seq_idx[j], None)
            finals.append(final.float())
            decay = torch.exp(A.float()[None] * dtj.float().sum(1))  # (1, H)
            decays.append(decay * self.whole[self.chunks[j]].to(decay.dtype))  # a document starting inside resets
        order = self.order(1)
        finals = gather_seq(torch.stack(finals), 0, self.cp.group)[order]  # (2W, 1, H, P, N), chunk order
        decays = gather_seq(torch.stack(decays), 0, self.cp.group)[order]  # (2W, 1, H)
        states = [torch.zeros_like(finals[0])]
        for c in range(1, 2 * W):  # h_c = T_{c-1} h_{c-1} + S_{c-1}, reset at document starts
            h = decays[c - 1][..., None, None] * states[-1] + finals[c - 1]
            states.append(h * self.continues[c].to(h.dtype))
        states = torch.stack(states)  # (2W, 1, H, P, N): the same graph on every rank (see conv)
        ys = [
            scan(xj, dtj, A, Bj, Cj, self.chunk_seq_idx[j], states[self.chunks[j]])[0]
            for j, (xj, dtj, Bj, Cj) in enumerate(parts)
        ]
        return torch.cat(ys, dim=1)


# The lower-right causal bias does not combine with SDPA's enable_gqa. Where a document's queries and keys are the
# same tokens (plain causal) one enable_gqa call serves, as in the model without context parallelism. Otherwise keys
# up to this many are repeated to the query heads (one call); longer ones get one call per query head against its
# kv head: the 7B's keys repeated over a 512K row were 1.5 GiB for k and for v, and as much for their gradients.
GQA_REPEAT_MAX_KEYS = 8192


def _attend_segment(q, k, v, mask, scale, group: int) -> torch.Tensor:
    """q (1, H, lq, hd); k, v (1, kv, lk, hd), H = kv · group; mask None: lq == lk, plain causal → (1, H, lq, hd)."""
    sdpa = partial(F.scaled_dot_product_attention, attn_mask=mask, is_causal=mask is None, scale=scale)
    if group == 1 or mask is None:
        return sdpa(q, k, v, enable_gqa=group > 1)
    if k.size(2) <= GQA_REPEAT_MAX_KEYS:
        return sdpa(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))
    # split, not slices: the backward is one concatenation, not a zero tensor the size of q per head
    ks, vs = k.split(1, dim=1), v.split(1, dim=1)
    heads = [sdpa(qh, ks[h // group], vs[h // group]) for h, qh in enumerate(q.split(1, dim=1))]
    return torch.cat(heads, dim=1)


def enable_context_parallel(model, group=None) -> ContextParallel:
    """Split every forward of the Falcon-H1 backbone(s) inside `model` (PEFT or other wrappers too) over `group`."""
    cp = ContextParallel(group)
    if not configure_backbones(model, context_parallel=cp):
        raise ValueError("context parallelism needs falcon-align's Falcon-H1 model (model.modeling.FalconH1Model)")
    return cp


def disable_context_parallel(model) -> None:
    configure_backbones(model, context_parallel=None)


def shard(input_ids, position_ids, labels=None, group=None, ignore_index=-100) -> dict:
    """This rank's two chunks of a (1, L) packed row, L a multiple of `row_multiple(world)` (2 chunks per rank).
    Labels are shifted on the whole row first (the next token of a chunk's last token lives in the next chunk) and
    returned as `shift_labels`; a document's last token predicts nothing (the next position starts another)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    L = input_ids.size(1)
    if L % row_multiple(world):
        raise ValueError(
            f"context parallelism needs a row length divisible by {row_multiple(world)} (2 chunks for each of "
            f"{world} ranks); got {L} (pad it)"
        )
    idx = local_index(L, world, rank, input_ids.device)
    out = {"input_ids": input_ids[:, idx], "position_ids": position_ids[:, idx]}
    if labels is not None:
        out["shift_labels"] = next_token_targets(position_ids, labels, ignore_index)[:, idx]
    return out


def next_token_targets(position_ids, labels, ignore_index=-100):
    """(1, L) labels shifted to the token each position predicts, ignored where that token starts another
    document (or past the row's end)."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    doc_end = F.pad(position_ids[:, 1:] != position_ids[:, :-1] + 1, (0, 1), value=True)
    return shifted.masked_fill(doc_end, ignore_index)
