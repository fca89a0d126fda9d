"""Our Triton kernels for the chunked Mamba-2 SSD scan, forward and backward. The twin is `ref.ssd_scan_ref`.

Per batch row b and head h, the sequence is cut into chunks of Q positions. Within chunk c, with a_t = A·dt_t and
cum_t = a_0 + ... + a_t (positions of the chunk):

    y_t      = Σ_{s≤t, same doc} (C_t·B_s) · exp(cum_t − cum_s) · dt_s · x_s        (the chunk's own tokens)
             + [doc_t = doc of S_in] · exp(cum_t) · S_in·C_t + D·x_t                 (the state entering the chunk)
    St       = Σ_{s, doc_s = doc at the chunk's end} exp(cum_last − cum_s) · dt_s · x_s ⊗ B_s
    S_in[c+1] = St[c] + [no document starts in chunk c] · exp(cum_last) · S_in[c]    (S_in[0]: the initial state)

Forward, three kernels: (1) dt (bias, softplus, limit fused), its chunk cumsum and each chunk's own state;
(2) the state passing over chunks; (3) the output, C·Bᵀ computed in place, the D skip fused.
Backward, five: (1) d S_in from y (and the y readout's term of d cum); (2) the state passing in reverse;
(3) per head: dx, ddt (with d dt_bias through the discretisation), dA, dD; (4) and (5) per group: dC and dB,
summed over the group's heads in registers (over runs of them in separate programs when rows are short, added
after: `_group_grad`).

d a_k (the gradient of one step's log-decay) is built from sums that never subtract large terms: the in-chunk term
is Σ_{t≥k} Σ_{s<k} T[t, s] with T[t, s] = (C_t·B_s)·exp(cum_t − cum_s)·dt_s·(dy_t·x_s), a prefix sum along s.

Documents packed in a row (`seq_idx`, non-decreasing) share nothing: no state and no in-chunk term crosses a change
of seq_idx. The initial state belongs to the document of position 0. Positions past the row's end have dt = 0.

Tensors: x (b, l, H, P); dt (b, l, H); A (H,); B, C (b, l, G, N), head h reading group h // (H/G); D (H,);
initial and final states (b, H, P, N) fp32. Kept for the backward: dt and its chunk cumsum (b, H, c, Q) fp32 and
the state entering each chunk (b, c, H, P, N) in `states_dtype`. Triton is optional: `available()` says whether
these kernels can run here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    from .state_update import softplus as _softplus  # one softplus for the scan and the decode step
except ImportError:  # CPU installs: available() is False and nothing below is called
    triton = tl = _softplus = None

NO_LIMIT = (0.0, math.inf)
# fp32 operands of every tl.dot: three TF32 products per product (Triton's "tf32x3"), near fp32's accuracy on the
# tensor cores; one TF32 product (Triton's default) left 5e-3 relative error in dA on a card. bf16 operands ignore it.
# ROCm's Triton has no tf32x3: plain fp32 products there.
F32_DOTS = tl.constexpr("ieee" if torch.version.hip else "tf32x3") if tl is not None else None
# block caps (powers of two ≥ 16, what tl.dot takes): rows of a tile, columns of the in-chunk loop (and of the
# per-head backward kernel's), the state's N per tile, P per output tile. Tests lower them to run every tiling loop on
# small shapes.
CAPS = dict(rows=64, cols=32, dx_cols=16, n=128, p=64)
# warps and software-pipelining stages per kernel. First choices, from compiling for sm_90 without a card (registers,
# spills and shared memory: the per-head backward kernel fits Hopper's 227 KB up to P 128, N 256 and in fp32 only
# without pipelining); to be tuned on the card: `python -m bench ssd-op --tune` sweeps these and CAPS
# the dB and dC kernels split a group's heads over more programs until about this many run (4 an SM on an H100)
GROUP_PROGRAMS = 512
LAUNCH = dict(
    chunk_state=dict(num_warps=4, num_stages=2),
    state_passing=dict(num_warps=4),
    output=dict(num_warps=4, num_stages=2),
    dstate_out=dict(num_warps=8, num_stages=1),
    dx=dict(num_warps=8, num_stages=1),
    dC=dict(num_warps=8, num_stages=2),
    dB=dict(num_warps=8, num_stages=2),
)


def available() -> bool:
    """Triton imports, and there is a GPU to run on (or Triton's CPU interpreter, TRITON_INTERPRET=1)."""
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


# ---------------------------------------------------------------- device helpers


@_jit
def _discretize(raw, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LIMIT: tl.constexpr, dt_min, dt_max):
    """raw dt (fp32) → dt = clamp(softplus(raw + bias)), each step where its flag says."""
    v = raw + bias if HAS_BIAS else raw
    if SOFTPLUS:
        v = _softplus(v)
    if LIMIT:
        v = tl.minimum(tl.maximum(v, dt_min), dt_max)
    return v


@_jit
def _discretize_grad(raw, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LIMIT: tl.constexpr, dt_min, dt_max):
    """d dt / d raw at `raw` (torch's conventions: softplus' = sigmoid below 20, clamp passes its closed range)."""
    v = raw + bias if HAS_BIAS else raw
    grad = tl.full(v.shape, 1.0, tl.float32)
    if SOFTPLUS:
        grad = tl.where(v > 20.0, 1.0, tl.sigmoid(v))
        v = _softplus(v)
    if LIMIT:
        grad = tl.where((v >= dt_min) & (v <= dt_max), grad, 0.0)
    return grad


@_jit
def _load_rows(ptr, pos, valid, cols, ncols, s_row, s_col):
    """(rows, cols) tile at ptr + pos·s_row + cols·s_col; zero where a row is not `valid` or a column is ≥ ncols."""
    return tl.load(
        ptr + pos[:, None] * s_row + cols[None, :] * s_col, mask=valid[:, None] & (cols[None, :] < ncols), other=0.0
    )


@_jit
def _chunk_steps(start, c, chunk, l, BLOCK: tl.constexpr):
    """Steps start … start+BLOCK−1 of chunk c → (their index in the chunk, their position in the row, valid)."""
    i = start + tl.arange(0, BLOCK)
    pos = c * chunk + i
    return i, pos, (i < chunk) & (pos < l)


@_jit
def _load_state(ptr, p, n, P, N):
    """(p, n) tile of one contiguous (P, N) state."""
    return tl.load(ptr + p[:, None] * N + n[None, :], mask=(p[:, None] < P) & (n[None, :] < N), other=0.0)


@_jit
def _doc_in(seq_ptr, c, chunk, stride_l):
    """The document of the state entering chunk c: that of the position before it (position 0's for chunk 0)."""
    return tl.load(seq_ptr + tl.maximum(c * chunk - 1, 0) * stride_l)


@_jit
def _doc_out(seq_ptr, c, chunk, l, stride_l):
    """The document of the state leaving chunk c: that of its last position in the row."""
    return tl.load(seq_ptr + (tl.minimum((c + 1) * chunk, l) - 1) * stride_l)


# ---------------------------------------------------------------- forward kernels
# Pointer names: x_h, dy_h: x and dy of one (row b, head h); B_g, C_g: B and C of one (row b, group g); seq_b: one
# row's seq_idx; sin_c, ds_c: one (b, c, h)'s contiguous (P, N) state; row: one (b, h, c)'s Q entries of dt_c, cum.


@_jit
def _chunk_state_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, bias_ptr, B_ptr, seq_ptr,
    dtc_ptr, cum_ptr, st_ptr,
    l, H, P, N, chunk, nc, ratio, dt_min, dt_max,
    sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h, sB_b, sB_l, sB_g, sB_n, ss_b, ss_l,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LIMIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (c, b·H, N blocks). Discretised dt and its cumsum → dt_c, cum (b, H, c, Q) (N block 0 writes them);
    the chunk's own end state St = (x·dt·decay_to_end)ᵀ·B → (b, c, H, P, N) fp32."""
    c, bh, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    b64 = b.to(tl.int64)
    t = tl.arange(0, BLOCK_Q)
    pos = c * chunk + t
    valid = (t < chunk) & (pos < l)
    raw = tl.load(dt_ptr + b64 * sdt_b + pos * sdt_l + h * sdt_h, mask=valid, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + h).to(tl.float32) if HAS_BIAS else 0.0
    dt = tl.where(valid, _discretize(raw, bias, HAS_BIAS, SOFTPLUS, LIMIT, dt_min, dt_max), 0.0)  # (Q,)
    a = dt * tl.load(A_ptr + h).to(tl.float32)
    cum = tl.cumsum(a, axis=0)
    if nb == 0:
        row = ((b64 * H + h) * nc + c) * chunk
        tl.store(dtc_ptr + row + t, dt, mask=t < chunk)
        tl.store(cum_ptr + row + t, cum, mask=t < chunk)
    scale = tl.exp(tl.sum(a, axis=0) - cum) * dt  # decay to the chunk's end · dt
    if HAS_SEQ:
        seq_b = seq_ptr + b64 * ss_b
        scale = tl.where(tl.load(seq_b + pos * ss_l, mask=valid, other=-1) == _doc_out(seq_b, c, chunk, l, ss_l),
                         scale, 0.0)  # fmt: skip
    p, n = tl.arange(0, BLOCK_P), nb * BLOCK_N + tl.arange(0, BLOCK_N)
    x = _load_rows(x_ptr + b64 * sx_b + h * sx_h, pos, valid, p, P, sx_l, sx_p)  # (Q, P)
    Bm = _load_rows(B_ptr + b64 * sB_b + (h // ratio) * sB_g, pos, valid, n, N, sB_l, sB_n)  # (Q, BLOCK_N)
    st = tl.dot(tl.trans((x * scale[:, None]).to(Bm.dtype)), Bm, input_precision=F32_DOTS)  # (P, BLOCK_N) fp32
    st_c = st_ptr + ((b64 * nc + c) * H + h) * P * N
    tl.store(st_c + p[:, None] * N + n[None, :], st, mask=(p[:, None] < P) & (n[None, :] < N))


@_jit
def _state_passing_fwd_kernel(
    st_ptr, cum_ptr, init_ptr, seq_ptr, sin_ptr, final_ptr,
    l, H, PN, chunk, nc, ss_b, ss_l,
    HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Grid (b·H, P·N blocks). S_in[c] (the state entering chunk c, (b, c, H, P, N)) and the final state (fp32):
    S ← St[c] + exp(cum_last)·S, S dropped where a document starts inside chunk c."""
    bh, blk = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    b64 = b.to(tl.int64)
    e = blk * BLOCK + tl.arange(0, BLOCK)
    mask = e < PN
    if HAS_INIT:
        S = tl.load(init_ptr + (b64 * H + h) * PN + e, mask=mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BLOCK,), tl.float32)
    if HAS_SEQ:
        doc = _doc_in(seq_ptr + b64 * ss_b, 0, chunk, ss_l)
    for c in range(nc):
        at = ((b64 * nc + c) * H + h) * PN
        tl.store(sin_ptr + at + e, S.to(sin_ptr.dtype.element_ty), mask=mask)
        decay = tl.exp(tl.load(cum_ptr + ((b64 * H + h) * nc + c) * chunk + chunk - 1))
        if HAS_SEQ:
            doc_next = _doc_out(seq_ptr + b64 * ss_b, c, chunk, l, ss_l)
            decay = tl.where(doc_next == doc, decay, 0.0)
            doc = doc_next
        S = tl.load(st_ptr + at + e, mask=mask, other=0.0) + decay * S
    tl.store(final_ptr + (b64 * H + h) * PN + e, S, mask=mask)


@_jit
def _chunk_output_fwd_kernel(
    x_ptr, dtc_ptr, cum_ptr, B_ptr, C_ptr, D_ptr, seq_ptr, sin_ptr, y_ptr,
    l, H, P, N, chunk, nc, ratio,
    sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n, ss_b, ss_l,
    HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (c · row blocks, b·H, P blocks). y rows t of chunk c: the entering state read out by C_t, the chunk's
    own tokens through (C_t·B_s)·decay·dt_s (s ≤ t, s in blocks of BLOCK_S, N in blocks of BLOCK_N), D·x_t →
    y (b, l, H, P)."""
    ct, bh, pb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row_blocks = tl.cdiv(chunk, BLOCK_T)
    c, tb = ct // row_blocks, ct % row_blocks
    b, h = bh // H, bh % H
    b64 = b.to(tl.int64)
    x_h, B_g = x_ptr + b64 * sx_b + h * sx_h, B_ptr + b64 * sB_b + (h // ratio) * sB_g
    C_g, sin_c = C_ptr + b64 * sC_b + (h // ratio) * sC_g, sin_ptr + ((b64 * nc + c) * H + h) * P * N
    t, pos_t, valid_t = _chunk_steps(tb * BLOCK_T, c, chunk, l, BLOCK_T)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    row = ((b64 * H + h) * nc + c) * chunk
    cum_t = tl.load(cum_ptr + row + t, mask=t < chunk, other=0.0)
    readout = tl.exp(cum_t)
    if HAS_SEQ:
        seq_b = seq_ptr + b64 * ss_b
        seq_t = tl.load(seq_b + pos_t * ss_l, mask=valid_t, other=-1)
        readout = tl.where(seq_t == _doc_in(seq_b, c, chunk, ss_l), readout, 0.0)
    acc = tl.zeros((BLOCK_T, BLOCK_P), tl.float32)
    for n0 in range(0, N, BLOCK_N):  # the entering state: C_t·S_inᵀ
        n = n0 + tl.arange(0, BLOCK_N)
        Ct = _load_rows(C_g, pos_t, valid_t, n, N, sC_l, sC_n)  # (T, BLOCK_N)
        acc += tl.dot(Ct, tl.trans(_load_state(sin_c, p, n, P, N).to(Ct.dtype)), input_precision=F32_DOTS)
    acc *= readout[:, None]
    for s0 in range(0, tl.minimum((tb + 1) * BLOCK_T, chunk), BLOCK_S):  # the chunk's own tokens, s ≤ t
        s, pos_s, valid_s = _chunk_steps(s0, c, chunk, l, BLOCK_S)
        CB = tl.zeros((BLOCK_T, BLOCK_S), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            Ct = _load_rows(C_g, pos_t, valid_t, n, N, sC_l, sC_n)
            CB += tl.dot(Ct, tl.trans(_load_rows(B_g, pos_s, valid_s, n, N, sB_l, sB_n)), input_precision=F32_DOTS)
        cum_s = tl.load(cum_ptr + row + s, mask=s < chunk, other=0.0)
        dt_s = tl.load(dtc_ptr + row + s, mask=s < chunk, other=0.0)
        keep = t[:, None] >= s[None, :]
        if HAS_SEQ:
            keep &= seq_t[:, None] == tl.load(seq_b + pos_s * ss_l, mask=valid_s, other=-2)[None, :]
        K = tl.where(keep, CB * tl.exp(tl.minimum(cum_t[:, None] - cum_s[None, :], 0.0)) * dt_s[None, :], 0.0)
        xs = _load_rows(x_h, pos_s, valid_s, p, P, sx_l, sx_p)  # (S, P)
        acc += tl.dot(K.to(xs.dtype), xs, input_precision=F32_DOTS)
    if HAS_D:
        xt = _load_rows(x_h, pos_t, valid_t, p, P, sx_l, sx_p)
        acc += tl.load(D_ptr + h).to(tl.float32) * xt.to(tl.float32)
    y_at = ((b64 * l + pos_t[:, None]) * H + h) * P + p[None, :]
    tl.store(y_ptr + y_at, acc.to(y_ptr.dtype.element_ty), mask=valid_t[:, None] & (p[None, :] < P))


# ---------------------------------------------------------------- backward kernels


@_jit
def _dstate_out_bwd_kernel(
    dy_ptr, cum_ptr, C_ptr, seq_ptr, sin_ptr, ds_ptr, usuf_ptr,
    l, H, P, N, chunk, nc, ratio,
    sdy_b, sdy_l, sdy_h, sdy_p, sC_b, sC_l, sC_g, sC_n, ss_b, ss_l,
    HAS_SEQ: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (c, b·H). From y's readout of the entering state, w_t = exp(cum_t)·[doc_t = doc of S_in]:
    d S_in[c] = (w·dy)ᵀ·C → ds (b, c, H, P, N) fp32, and that readout's term of d cum, U_t = w_t·dy_t·(S_in·C_t),
    as the suffix sums Σ_{t≥k} U_t → usuf (b, H, c, Q) fp32 (cum_t depends on every a_k with k ≤ t)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    b64 = b.to(tl.int64)
    C_g, at = C_ptr + b64 * sC_b + (h // ratio) * sC_g, ((b64 * nc + c) * H + h) * P * N
    t = tl.arange(0, BLOCK_Q)
    pos = c * chunk + t
    valid = (t < chunk) & (pos < l)
    p = tl.arange(0, BLOCK_P)
    row = ((b64 * H + h) * nc + c) * chunk
    w = tl.where(valid, tl.exp(tl.load(cum_ptr + row + t, mask=t < chunk, other=0.0)), 0.0)
    if HAS_SEQ:
        seq_b = seq_ptr + b64 * ss_b
        w = tl.where(tl.load(seq_b + pos * ss_l, mask=valid, other=-1) == _doc_in(seq_b, c, chunk, ss_l), w, 0.0)
    dy = _load_rows(dy_ptr + b64 * sdy_b + h * sdy_h, pos, valid, p, P, sdy_l, sdy_p)  # (Q, P)
    dyw = tl.trans((dy * w[:, None]).to(dy.dtype))  # (P, Q)
    CS = tl.zeros((BLOCK_Q, BLOCK_P), tl.float32)  # S_in·C_t
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        Cm = _load_rows(C_g, pos, valid, n, N, sC_l, sC_n)  # (Q, BLOCK_N)
        pn_mask = (p[:, None] < P) & (n[None, :] < N)
        dS = tl.dot(dyw.to(Cm.dtype), Cm, input_precision=F32_DOTS)  # (P, BLOCK_N)
        tl.store(ds_ptr + at + p[:, None] * N + n[None, :], dS, mask=pn_mask)
        CS += tl.dot(Cm, tl.trans(_load_state(sin_ptr + at, p, n, P, N).to(Cm.dtype)), input_precision=F32_DOTS)
    U = w * tl.sum(dy.to(tl.float32) * CS, axis=1)
    tl.store(usuf_ptr + row + t, tl.cumsum(U, axis=0, reverse=True), mask=t < chunk)


@_jit
def _state_passing_bwd_kernel(
    ds_ptr, cum_ptr, dfinal_ptr, seq_ptr, dinit_ptr,
    l, H, PN, chunk, nc, ss_b, ss_l,
    HAS_DFINAL: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Grid (b·H, P·N blocks). In place over ds: d S_in[c] (from y) in, d St[c] = d S_in[c+1] out, where
    d S_in[c] = (from y) + exp(cum_last)·[no document starts in chunk c]·d S_in[c+1] and d S_in[nc] = d final.
    d S_in[0] → dinit (fp32)."""
    bh, blk = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    b64 = b.to(tl.int64)
    e = blk * BLOCK + tl.arange(0, BLOCK)
    mask = e < PN
    if HAS_DFINAL:
        dS = tl.load(dfinal_ptr + (b64 * H + h) * PN + e, mask=mask, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros((BLOCK,), tl.float32)
    for i in range(nc):
        c = nc - 1 - i
        at = ((b64 * nc + c) * H + h) * PN
        from_y = tl.load(ds_ptr + at + e, mask=mask, other=0.0)
        tl.store(ds_ptr + at + e, dS, mask=mask)
        decay = tl.exp(tl.load(cum_ptr + ((b64 * H + h) * nc + c) * chunk + chunk - 1))
        if HAS_SEQ:
            seq_b = seq_ptr + b64 * ss_b
            decay = tl.where(_doc_out(seq_b, c, chunk, l, ss_l) == _doc_in(seq_b, c, chunk, ss_l), decay, 0.0)
        dS = from_y + decay * dS
    if HAS_INIT:
        tl.store(dinit_ptr + (b64 * H + h) * PN + e, dS, mask=mask)


@_jit
def _end_decay_term(ds_at, sin_at, p, P, N, cum_last, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """The chunk-end decay's term of d a, the same for every step of the chunk: exp(cum_last)·<d S_in[c+1], S_in[c]>
    (both states (P, N), contiguous)."""
    carried = tl.zeros((BLOCK_P,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        carried += tl.sum(_load_state(ds_at, p, n, P, N) * _load_state(sin_at, p, n, P, N).to(tl.float32), axis=1)
    return tl.exp(cum_last) * tl.sum(carried, axis=0)


@_jit
def _cb_and_bds(
    B_g, C_g, ds_at, pos_t, valid_t, pos_s, valid_s, p, P, N, sB_l, sB_n, sC_l, sC_n,
    BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """→ C_t·B_s (Q, S) and d St·B_s (S, P), fp32, over N in blocks of BLOCK_N."""
    CB = tl.zeros((BLOCK_Q, BLOCK_S), tl.float32)
    BdS = tl.zeros((BLOCK_S, BLOCK_P), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        Bs = _load_rows(B_g, pos_s, valid_s, n, N, sB_l, sB_n)  # (S, BLOCK_N)
        CB += tl.dot(_load_rows(C_g, pos_t, valid_t, n, N, sC_l, sC_n), tl.trans(Bs), input_precision=F32_DOTS)
        BdS += tl.dot(Bs, tl.trans(_load_state(ds_at, p, n, P, N).to(Bs.dtype)), input_precision=F32_DOTS)
    return CB, BdS


@_jit
def _d_skip(dx, dD_acc, Dh, dy, x):
    """The D skip's terms: dx + D·dy (S, P) and dD_acc + Σ dy·x."""
    dy = dy.to(tl.float32)
    return dx + Dh * dy, dD_acc + tl.sum(tl.sum(dy * x.to(tl.float32), axis=1), axis=0)


@_jit
def _store_three(ptr, a, b, c):
    tl.store(ptr, a)
    tl.store(ptr + 1, b)
    tl.store(ptr + 2, c)


@_jit
def _store_dx_ddt(dx_ptr, ddt_ptr, at, p, P, valid, dx, ddt):
    """dx (S, P) and ddt (S,) of one head at flat (b·l + position)·H + h offsets `at` (S,)."""
    mask = valid[:, None] & (p[None, :] < P)
    tl.store(dx_ptr + at[:, None] * P + p[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(ddt_ptr + at, ddt.to(ddt_ptr.dtype.element_ty), mask=valid)


@_jit
def _chunk_dx_bwd_kernel(
    x_ptr, dy_ptr, dt_ptr, A_ptr, bias_ptr, B_ptr, C_ptr, D_ptr, seq_ptr,
    dtc_ptr, cum_ptr, sin_ptr, ds_ptr, usuf_ptr, dx_ptr, ddt_ptr, red_ptr,
    l, H, P, N, chunk, nc, ratio, dt_min, dt_max,
    sx_b, sx_l, sx_h, sx_p, sdy_b, sdy_l, sdy_h, sdy_p, sdt_b, sdt_l, sdt_h,
    sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n, ss_b, ss_l,
    HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LIMIT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (c, b·H): one head's chunk, every row t held, the columns s in blocks of BLOCK_S, N in blocks of BLOCK_N.
    Per column block: dx_s = dt_s·Σ_t K[t, s]·dy_t + dt_s·decay_to_end_s·(d St·B_s) + D·dy_s, with
    K = (C_t·B_s)·exp(cum_t − cum_s); ddt_s, its direct terms plus A·d a_s; d a_s from the in-chunk prefix sums, the
    state terms and the readout's suffix sums (usuf); ddt chained through the discretisation → ddt (b, l, H).
    Per program: Σ dt·d a, Σ dy·x and Σ d raw dt → red (b, c, H, 3) for dA, dD and d dt_bias."""
    c, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    b64 = b.to(tl.int64)
    x_h, dy_h = x_ptr + b64 * sx_b + h * sx_h, dy_ptr + b64 * sdy_b + h * sdy_h
    B_g, C_g = B_ptr + b64 * sB_b + (h // ratio) * sB_g, C_ptr + b64 * sC_b + (h // ratio) * sC_g
    at = ((b64 * nc + c) * H + h) * P * N
    t, pos_t, valid_t = _chunk_steps(0, c, chunk, l, BLOCK_Q)
    p = tl.arange(0, BLOCK_P)
    row = ((b64 * H + h) * nc + c) * chunk
    cum_t = tl.load(cum_ptr + row + t, mask=t < chunk, other=0.0)
    cum_last = tl.load(cum_ptr + row + chunk - 1)
    dy = _load_rows(dy_h, pos_t, valid_t, p, P, sdy_l, sdy_p)  # (Q, P)
    carried = _end_decay_term(ds_ptr + at, sin_ptr + at, p, P, N, cum_last, BLOCK_P, BLOCK_N)
    if HAS_SEQ:
        seq_b = seq_ptr + b64 * ss_b
        seq_t = tl.load(seq_b + pos_t * ss_l, mask=valid_t, other=-1)
        doc_end = _doc_out(seq_b, c, chunk, l, ss_l)
        carried = tl.where(doc_end == _doc_in(seq_b, c, chunk, ss_l), carried, 0.0)
    A = tl.load(A_ptr + h).to(tl.float32)
    bias = tl.load(bias_ptr + h).to(tl.float32) if HAS_BIAS else 0.0
    Dh = tl.load(D_ptr + h).to(tl.float32) if HAS_D else 0.0
    row_prefix = tl.zeros((BLOCK_Q,), tl.float32)  # Σ_{s < this block} T[t, s]
    state_prefix = 0.0  # Σ_{s < this block} V_s
    dA_acc, dD_acc, dbias_acc = 0.0, 0.0, 0.0
    for s0 in range(0, BLOCK_Q, BLOCK_S):
        s, pos_s, valid_s = _chunk_steps(s0, c, chunk, l, BLOCK_S)
        dt_s = tl.load(dtc_ptr + row + s, mask=s < chunk, other=0.0)
        cum_s = tl.load(cum_ptr + row + s, mask=s < chunk, other=0.0)
        xs = _load_rows(x_h, pos_s, valid_s, p, P, sx_l, sx_p)  # (S, P)
        CB, BdS = _cb_and_bds(
            B_g, C_g, ds_ptr + at, pos_t, valid_t, pos_s, valid_s, p, P, N, sB_l, sB_n, sC_l, sC_n,
            BLOCK_Q, BLOCK_S, BLOCK_P, BLOCK_N,
        )  # fmt: skip
        causal = t[:, None] >= s[None, :]
        keep = causal
        to_end = tl.exp(cum_last - cum_s)
        if HAS_SEQ:
            seq_s = tl.load(seq_b + pos_s * ss_l, mask=valid_s, other=-2)
            keep &= seq_t[:, None] == seq_s[None, :]
            to_end = tl.where(seq_s == doc_end, to_end, 0.0)
        K = tl.where(keep, CB * tl.exp(tl.minimum(cum_t[:, None] - cum_s[None, :], 0.0)), 0.0)
        Kdyx = K * tl.dot(dy, tl.trans(xs.to(dy.dtype)), input_precision=F32_DOTS)  # (Q, S): K·dy_t·x_s
        ddt = tl.sum(Kdyx, axis=0)  # (S,)
        T = Kdyx * dt_s[None, :]
        prefix = row_prefix[:, None] + tl.cumsum(T, axis=1) - T  # Σ_{s' < s} T[t, s']
        da = tl.sum(tl.where(causal, prefix, 0.0), axis=0)  # Σ_{t ≥ s}
        row_prefix += tl.sum(T, axis=1)
        dx = tl.dot(tl.trans(K.to(dy.dtype)), dy, input_precision=F32_DOTS)  # (S, P)
        dx = (dx + BdS * to_end[:, None]) * dt_s[:, None]
        state = to_end * tl.sum(xs.to(tl.float32) * BdS, axis=1)  # (S,): d/d dt_s of St
        ddt += state
        V = state * dt_s
        da += state_prefix + tl.cumsum(V, axis=0) - V + tl.load(usuf_ptr + row + s, mask=s < chunk, other=0.0)
        da += carried
        state_prefix += tl.sum(V, axis=0)
        if HAS_D:  # the D skip: dx += D·dy, dD += <dy, x>
            dx, dD_acc = _d_skip(dx, dD_acc, Dh, _load_rows(dy_h, pos_s, valid_s, p, P, sdy_l, sdy_p), xs)
        ddt += A * da
        dA_acc += tl.sum(dt_s * da, axis=0)
        if HAS_BIAS or SOFTPLUS or LIMIT:
            raw = tl.load(dt_ptr + b64 * sdt_b + pos_s * sdt_l + h * sdt_h, mask=valid_s, other=0.0).to(tl.float32)
            ddt *= _discretize_grad(raw, bias, HAS_BIAS, SOFTPLUS, LIMIT, dt_min, dt_max)
            dbias_acc += tl.sum(tl.where(valid_s, ddt, 0.0), axis=0)
        _store_dx_ddt(dx_ptr, ddt_ptr, (b64 * l + pos_s) * H + h, p, P, valid_s, dx, ddt)
    _store_three(red_ptr + ((b64 * nc + c) * H + h) * 3, dA_acc, dD_acc, dbias_acc)


@_jit
def _group_part(bgk, G, ratio, heads):
    """Program id over b·G·parts → (b, group, part k, its first head): part k sums heads h0 .. h0 + heads − 1."""
    parts = ratio // heads
    b, rest = bgk // (G * parts), bgk % (G * parts)
    g, k = rest // parts, rest % parts
    return b, g, k, g * ratio + k * heads


@_jit
def _chunk_dC_bwd_kernel(
    x_ptr, dy_ptr, B_ptr, seq_ptr, dtc_ptr, cum_ptr, sin_ptr, dC_ptr,
    l, H, P, N, chunk, nc, ratio, G, heads, part_stride,
    sx_b, sx_l, sx_h, sx_p, sdy_b, sdy_l, sdy_h, sdy_p, sB_b, sB_l, sB_g, sB_n, ss_b, ss_l,
    HAS_SEQ: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (c · row blocks, b·G·parts, N blocks). dC rows t of one group, summed in registers over `heads` of its
    heads (part k: the k-th run of them): Σ_h w_t·dy_t·S_in + Σ_{s ≤ t} (Σ_h dy_t·x_s·exp(cum_t − cum_s)·dt_s)·B_s
    → dC (parts, b, l, G, N), parts part_stride apart."""
    ct, bgk, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row_blocks = tl.cdiv(chunk, BLOCK_T)
    c, tb = ct // row_blocks, ct % row_blocks
    b, g, k, h0 = _group_part(bgk, G, ratio, heads)
    b64 = b.to(tl.int64)
    t, pos_t, valid_t = _chunk_steps(tb * BLOCK_T, c, chunk, l, BLOCK_T)
    p, n = tl.arange(0, BLOCK_P), nb * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_SEQ:
        seq_b = seq_ptr + b64 * ss_b
        seq_t = tl.load(seq_b + pos_t * ss_l, mask=valid_t, other=-1)
        doc_in = _doc_in(seq_b, c, chunk, ss_l)
    acc = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
    for i in range(heads):  # the entering state's readout
        h = h0 + i
        row = ((b64 * H + h) * nc + c) * chunk
        w = tl.where(valid_t, tl.exp(tl.load(cum_ptr + row + t, mask=t < chunk, other=0.0)), 0.0)
        if HAS_SEQ:
            w = tl.where(seq_t == doc_in, w, 0.0)
        dy = _load_rows(dy_ptr + b64 * sdy_b + h * sdy_h, pos_t, valid_t, p, P, sdy_l, sdy_p)  # (T, P)
        S = _load_state(sin_ptr + ((b64 * nc + c) * H + h) * P * N, p, n, P, N)  # (P, BLOCK_N)
        acc += tl.dot((dy * w[:, None]).to(dy.dtype), S.to(dy.dtype), input_precision=F32_DOTS)
    for s0 in range(0, tl.minimum((tb + 1) * BLOCK_T, chunk), BLOCK_S):  # the chunk's own tokens, s ≤ t
        s, pos_s, valid_s = _chunk_steps(s0, c, chunk, l, BLOCK_S)
        keep = t[:, None] >= s[None, :]
        if HAS_SEQ:
            keep &= seq_t[:, None] == tl.load(seq_b + pos_s * ss_l, mask=valid_s, other=-2)[None, :]
        dCB = tl.zeros((BLOCK_T, BLOCK_S), tl.float32)  # Σ_h dy_t·x_s·decay·dt_s
        for i in range(heads):
            h = h0 + i
            row = ((b64 * H + h) * nc + c) * chunk
            cum_t = tl.load(cum_ptr + row + t, mask=t < chunk, other=0.0)
            cum_s = tl.load(cum_ptr + row + s, mask=s < chunk, other=0.0)
            dt_s = tl.load(dtc_ptr + row + s, mask=s < chunk, other=0.0)
            dy = _load_rows(dy_ptr + b64 * sdy_b + h * sdy_h, pos_t, valid_t, p, P, sdy_l, sdy_p)  # (T, P)
            xs = _load_rows(x_ptr + b64 * sx_b + h * sx_h, pos_s, valid_s, p, P, sx_l, sx_p)  # (S, P)
            decay = tl.exp(tl.minimum(cum_t[:, None] - cum_s[None, :], 0.0)) * dt_s[None, :]
            dCB += tl.dot(dy, tl.trans(xs.to(dy.dtype)), input_precision=F32_DOTS) * decay
        Bs = _load_rows(B_ptr + b64 * sB_b + g * sB_g, pos_s, valid_s, n, N, sB_l, sB_n)  # (S, BLOCK_N)
        acc += tl.dot(tl.where(keep, dCB, 0.0).to(Bs.dtype), Bs, input_precision=F32_DOTS)
    dC_at = k * part_stride + ((b64 * l + pos_t[:, None]) * G + g) * N + n[None, :]
    tl.store(dC_ptr + dC_at, acc.to(dC_ptr.dtype.element_ty), mask=valid_t[:, None] & (n[None, :] < N))


@_jit
def _chunk_dB_bwd_kernel(
    x_ptr, dy_ptr, C_ptr, seq_ptr, dtc_ptr, cum_ptr, ds_ptr, dB_ptr,
    l, H, P, N, chunk, nc, ratio, G, heads, part_stride,
    sx_b, sx_l, sx_h, sx_p, sdy_b, sdy_l, sdy_h, sdy_p, sC_b, sC_l, sC_g, sC_n, ss_b, ss_l,
    HAS_SEQ: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (c · row blocks, b·G·parts, N blocks). dB rows s of one group, summed in registers over `heads` of its
    heads (part k: the k-th run of them): Σ_h decay_to_end_s·dt_s·x_s·d St + Σ_{t ≥ s} (Σ_h x_s·dy_t·exp(cum_t −
    cum_s)·dt_s)·C_t → dB (parts, b, l, G, N), parts part_stride apart."""
    cs, bgk, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row_blocks = tl.cdiv(chunk, BLOCK_S)
    c, sb = cs // row_blocks, cs % row_blocks
    b, g, k, h0 = _group_part(bgk, G, ratio, heads)
    b64 = b.to(tl.int64)
    s, pos_s, valid_s = _chunk_steps(sb * BLOCK_S, c, chunk, l, BLOCK_S)
    p, n = tl.arange(0, BLOCK_P), nb * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_SEQ:
        seq_b = seq_ptr + b64 * ss_b
        seq_s = tl.load(seq_b + pos_s * ss_l, mask=valid_s, other=-1)
        doc_end = _doc_out(seq_b, c, chunk, l, ss_l)
    acc = tl.zeros((BLOCK_S, BLOCK_N), tl.float32)
    for i in range(heads):  # the chunk's own end state
        h = h0 + i
        row = ((b64 * H + h) * nc + c) * chunk
        cum_s = tl.load(cum_ptr + row + s, mask=s < chunk, other=0.0)
        scale = tl.exp(tl.load(cum_ptr + row + chunk - 1) - cum_s) * tl.load(
            dtc_ptr + row + s, mask=s < chunk, other=0.0
        )
        if HAS_SEQ:
            scale = tl.where(seq_s == doc_end, scale, 0.0)
        xs = _load_rows(x_ptr + b64 * sx_b + h * sx_h, pos_s, valid_s, p, P, sx_l, sx_p)  # (S, P)
        dSt = _load_state(ds_ptr + ((b64 * nc + c) * H + h) * P * N, p, n, P, N)  # (P, BLOCK_N)
        acc += tl.dot((xs * scale[:, None]).to(xs.dtype), dSt.to(xs.dtype), input_precision=F32_DOTS)
    for t0 in range(sb * BLOCK_S, chunk, BLOCK_T):  # the chunk's own tokens, t ≥ s
        t, pos_t, valid_t = _chunk_steps(t0, c, chunk, l, BLOCK_T)
        keep = t[None, :] >= s[:, None]
        if HAS_SEQ:
            keep &= seq_s[:, None] == tl.load(seq_b + pos_t * ss_l, mask=valid_t, other=-2)[None, :]
        dBC = tl.zeros((BLOCK_S, BLOCK_T), tl.float32)  # Σ_h x_s·dy_t·decay·dt_s
        for i in range(heads):
            h = h0 + i
            row = ((b64 * H + h) * nc + c) * chunk
            cum_t = tl.load(cum_ptr + row + t, mask=t < chunk, other=0.0)
            cum_s = tl.load(cum_ptr + row + s, mask=s < chunk, other=0.0)
            dt_s = tl.load(dtc_ptr + row + s, mask=s < chunk, other=0.0)
            xs = _load_rows(x_ptr + b64 * sx_b + h * sx_h, pos_s, valid_s, p, P, sx_l, sx_p)  # (S, P)
            dy = _load_rows(dy_ptr + b64 * sdy_b + h * sdy_h, pos_t, valid_t, p, P, sdy_l, sdy_p)  # (T, P)
            decay = tl.exp(tl.minimum(cum_t[None, :] - cum_s[:, None], 0.0)) * dt_s[:, None]
            dBC += tl.dot(xs, tl.trans(dy.to(xs.dtype)), input_precision=F32_DOTS) * decay
        Ct = _load_rows(C_ptr + b64 * sC_b + g * sC_g, pos_t, valid_t, n, N, sC_l, sC_n)  # (T, BLOCK_N)
        acc += tl.dot(tl.where(keep, dBC, 0.0).to(Ct.dtype), Ct, input_precision=F32_DOTS)
    dB_at = k * part_stride + ((b64 * l + pos_s[:, None]) * G + g) * N + n[None, :]
    tl.store(dB_ptr + dB_at, acc.to(dB_ptr.dtype.element_ty), mask=valid_s[:, None] & (n[None, :] < N))


# ---------------------------------------------------------------- forward entry point


@dataclass(frozen=True)
class _Blocks:
    Q: int  # the chunk, padded
    P: int  # the head, padded
    rows: int  # rows of an output tile
    cols: int  # columns of the in-chunk loop
    dx_cols: int  # columns of the per-head backward kernel's loop
    n: int  # N per tile
    p: int  # P per output tile of the forward


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _blocks(chunk: int, P: int, N: int) -> _Blocks:
    Q = _pow2(chunk)
    P2 = _pow2(P)
    rows, cols, dx_cols = (min(CAPS[k], Q) for k in ("rows", "cols", "dx_cols"))
    return _Blocks(Q, P2, rows, cols, dx_cols, min(CAPS["n"], _pow2(N)), min(CAPS["p"], P2))


@dataclass(frozen=True)
class _Dt:
    """How the kernels discretise dt: raw + bias → softplus → clamp, each where asked."""

    bias: Tensor | None
    softplus: bool
    limit: tuple[float, float]

    @property
    def clamps(self) -> bool:
        return tuple(self.limit) != NO_LIMIT

    def args(self, like: Tensor) -> tuple:
        """(bias pointer, dt_min, dt_max) for a kernel; a dummy pointer without a bias."""
        lo, hi = (float(v) for v in self.limit)
        return (self.bias if self.bias is not None else like, lo, min(hi, 3.0e38))

    def flags(self) -> dict:
        return dict(HAS_BIAS=self.bias is not None, SOFTPLUS=self.softplus, LIMIT=self.clamps)


def _check(x, dt, A, B, C, chunk_size, D, initial_states, seq_idx):
    b, l, H, P = x.shape
    G, N = B.shape[-2:]
    if dt.shape != (b, l, H) or A.shape != (H,) or B.shape != (b, l, G, N) or C.shape != B.shape:
        got = f"x {tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}"
        raise ValueError(f"ssd: shapes {got}: want (b, l, H, P), (b, l, H), (H,), (b, l, G, N) twice")
    if H % G:
        raise ValueError(f"ssd: {H} heads do not split into {G} groups")
    if D is not None and D.shape != (H,):
        raise ValueError(f"ssd: D {tuple(D.shape)}, want ({H},)")
    if initial_states is not None and initial_states.shape != (b, H, P, N):
        raise ValueError(f"ssd: initial_states {tuple(initial_states.shape)}, want {(b, H, P, N)}")
    if seq_idx is not None and seq_idx.shape != (b, l):
        raise ValueError(f"ssd: seq_idx {tuple(seq_idx.shape)}, want {(b, l)}")
    if chunk_size < 1:
        raise ValueError(f"ssd: chunk_size {chunk_size}")


def _seq(seq_idx, like):
    """seq_idx as int32 → (pointer, stride_b, stride_l); a dummy without one."""
    if seq_idx is None:
        return like, 0, 0
    seq_idx = seq_idx.to(torch.int32)
    return seq_idx, seq_idx.stride(0), seq_idx.stride(1)


def chunk_states(x, dt, A, B, chunk_size, dtd: _Dt, initial_states=None, seq_idx=None, states_dtype=None):
    """Kernels (1) and (2) → dt_c, cum (b, H, c, Q) fp32; S_in (b, c, H, P, N) in states_dtype; final (b, H, P, N)
    fp32. The backward calls it again where the forward kept nothing."""
    b, l, H, P = x.shape
    G, N = B.shape[-2:]
    nc = -(-l // chunk_size)
    blk = _blocks(chunk_size, P, N)
    f32 = dict(device=x.device, dtype=torch.float32)
    dt_c, cum = torch.empty(b, H, nc, chunk_size, **f32), torch.empty(b, H, nc, chunk_size, **f32)
    st = torch.empty(b, nc, H, P, N, **f32)
    seq, ss_b, ss_l = _seq(seq_idx, x)
    bias, lo, hi = dtd.args(A)
    grid = (nc, b * H, triton.cdiv(N, blk.n))
    _chunk_state_fwd_kernel[grid](
        x, dt, A, bias, B, seq, dt_c, cum, st,
        l, H, P, N, chunk_size, nc, H // G, lo, hi,
        *x.stride(), *dt.stride(), *B.stride(), ss_b, ss_l,
        **dtd.flags(), HAS_SEQ=seq_idx is not None, BLOCK_Q=blk.Q, BLOCK_P=blk.P, BLOCK_N=blk.n,
        **LAUNCH["chunk_state"],
    )  # fmt: skip
    states = torch.empty(b, nc, H, P, N, device=x.device, dtype=states_dtype or x.dtype)
    final = torch.empty(b, H, P, N, **f32)
    init = initial_states.contiguous() if initial_states is not None else st
    block = min(1024, triton.next_power_of_2(P * N))
    _state_passing_fwd_kernel[(b * H, triton.cdiv(P * N, block))](
        st, cum, init, seq, states, final, l, H, P * N, chunk_size, nc, ss_b, ss_l,
        HAS_INIT=initial_states is not None, HAS_SEQ=seq_idx is not None, BLOCK=block, **LAUNCH["state_passing"],
    )  # fmt: skip
    return dt_c, cum, states, final


def ssd_forward(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=False, dt_limit=NO_LIMIT,
                initial_states=None, seq_idx=None, states_dtype=None):  # fmt: skip
    """→ y (b, l, H, P) in x.dtype, final state (b, H, P, N) fp32, and for the backward dt_c, cum (b, H, c, Q)
    fp32 and S_in (b, c, H, P, N) in states_dtype (default x.dtype). dt is raw when dt_bias / dt_softplus /
    dt_limit ask for the discretisation, else already discretised."""
    _check(x, dt, A, B, C, chunk_size, D, initial_states, seq_idx)
    dtd = _Dt(dt_bias, dt_softplus, tuple(dt_limit))
    dt_c, cum, states, final = chunk_states(x, dt, A, B, chunk_size, dtd, initial_states, seq_idx, states_dtype)
    b, l, H, P = x.shape
    G, N = B.shape[-2:]
    nc = dt_c.shape[2]
    blk = _blocks(chunk_size, P, N)
    y = torch.empty(b, l, H, P, device=x.device, dtype=x.dtype)
    seq, ss_b, ss_l = _seq(seq_idx, x)
    grid = (nc * triton.cdiv(chunk_size, blk.rows), b * H, triton.cdiv(P, blk.p))
    _chunk_output_fwd_kernel[grid](
        x, dt_c, cum, B, C, D if D is not None else A, seq, states, y,
        l, H, P, N, chunk_size, nc, H // G,
        *x.stride(), *B.stride(), *C.stride(), ss_b, ss_l,
        HAS_D=D is not None, HAS_SEQ=seq_idx is not None,
        BLOCK_T=blk.rows, BLOCK_S=blk.cols, BLOCK_P=blk.p, BLOCK_N=blk.n, **LAUNCH["output"],
    )  # fmt: skip
    return y, final, dt_c, cum, states


# ---------------------------------------------------------------- backward entry point


def ssd_backward(dy, dfinal, x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=False, dt_limit=NO_LIMIT,
                 initial_states=None, seq_idx=None, dt_c=None, cum=None, states=None):  # fmt: skip
    """→ dx, ddt, dA, dB, dC, dD (None without D), d initial states (None without them, fp32), d dt_bias (None
    without it). dfinal: the final state's gradient, or None. dt_c, cum, states: what ssd_forward kept, or None to
    recompute them (kernels (1) and (2) of the forward)."""
    _check(x, dt, A, B, C, chunk_size, D, initial_states, seq_idx)
    dtd = _Dt(dt_bias, dt_softplus, tuple(dt_limit))
    if states is None:
        dt_c, cum, states, _ = chunk_states(x, dt, A, B, chunk_size, dtd, initial_states, seq_idx)
    b, l, H, P = x.shape
    G, N = B.shape[-2:]
    nc = dt_c.shape[2]
    blk = _blocks(chunk_size, P, N)
    f32 = dict(device=x.device, dtype=torch.float32)
    seq, ss_b, ss_l = _seq(seq_idx, x)
    shapes = dict(l=l, H=H, P=P, N=N, chunk=chunk_size, nc=nc)
    ds, usuf = torch.empty(b, nc, H, P, N, **f32), torch.empty(b, H, nc, chunk_size, **f32)
    _dstate_out_bwd_kernel[(nc, b * H)](
        dy, cum, C, seq, states, ds, usuf, *shapes.values(), H // G, *dy.stride(), *C.stride(), ss_b, ss_l,
        HAS_SEQ=seq_idx is not None, BLOCK_Q=blk.Q, BLOCK_P=blk.P, BLOCK_N=blk.n, **LAUNCH["dstate_out"],
    )  # fmt: skip
    dinit = torch.empty(b, H, P, N, **f32) if initial_states is not None else None
    block = min(1024, triton.next_power_of_2(P * N))
    _state_passing_bwd_kernel[(b * H, triton.cdiv(P * N, block))](
        ds, cum, dfinal.contiguous() if dfinal is not None else ds, seq, dinit if dinit is not None else ds,
        l, H, P * N, chunk_size, nc, ss_b, ss_l,
        HAS_DFINAL=dfinal is not None, HAS_INIT=dinit is not None, HAS_SEQ=seq_idx is not None, BLOCK=block,
    )  # fmt: skip
    dx, ddt = torch.empty(b, l, H, P, device=x.device, dtype=x.dtype), torch.empty(b, l, H, **f32)
    red = torch.empty(b, nc, H, 3, **f32)
    bias, lo, hi = dtd.args(A)
    _chunk_dx_bwd_kernel[(nc, b * H)](
        x, dy, dt, A, bias, B, C, D if D is not None else A, seq, dt_c, cum, states, ds, usuf, dx, ddt, red,
        *shapes.values(), H // G, lo, hi,
        *x.stride(), *dy.stride(), *dt.stride(), *B.stride(), *C.stride(), ss_b, ss_l,
        HAS_D=D is not None, HAS_SEQ=seq_idx is not None, **dtd.flags(),
        BLOCK_Q=blk.Q, BLOCK_S=blk.dx_cols, BLOCK_P=blk.P, BLOCK_N=blk.n, **LAUNCH["dx"],
    )  # fmt: skip
    n_blocks = triton.cdiv(N, blk.n)
    tiles = dict(HAS_SEQ=seq_idx is not None, BLOCK_T=blk.rows, BLOCK_S=blk.cols, BLOCK_P=blk.P, BLOCK_N=blk.n)
    dC_blocks, dB_blocks = nc * triton.cdiv(chunk_size, blk.rows), nc * triton.cdiv(chunk_size, blk.cols)
    dC, parts, part_stride = _group_grad(C, dC_blocks * b * G * n_blocks, H // G)
    _chunk_dC_bwd_kernel[(dC_blocks, b * G * parts, n_blocks)](
        x, dy, B, seq, dt_c, cum, states, dC, *shapes.values(), H // G, G, H // G // parts, part_stride,
        *x.stride(), *dy.stride(), *B.stride(), ss_b, ss_l, **tiles, **LAUNCH["dC"],
    )  # fmt: skip
    dB, parts, part_stride = _group_grad(B, dB_blocks * b * G * n_blocks, H // G)
    _chunk_dB_bwd_kernel[(dB_blocks, b * G * parts, n_blocks)](
        x, dy, C, seq, dt_c, cum, ds, dB, *shapes.values(), H // G, G, H // G // parts, part_stride,
        *x.stride(), *dy.stride(), *C.stride(), ss_b, ss_l, **tiles, **LAUNCH["dB"],
    )  # fmt: skip
    dC = dC.sum(0).to(C.dtype) if dC.dim() == 5 else dC
    dB = dB.sum(0).to(B.dtype) if dB.dim() == 5 else dB
    # one reduction each: gradients that shared one buffer would alias (a custom op may not return those)
    dA = red[..., 0].sum((0, 1)).to(A.dtype)
    dD = red[..., 1].sum((0, 1)).to(D.dtype) if D is not None else None
    ddt_bias = red[..., 2].sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None else None
    return dx, ddt.to(dt.dtype), dA, dB, dC, dD, dinit, ddt_bias


def _group_grad(like: Tensor, programs: int, ratio: int) -> tuple[Tensor, int, int]:
    """The dB or dC kernel's output and how its heads are split → (out, parts, part stride). Each program sums a group's
    heads in registers; with few programs (short rows, one group: 128 at 8K tokens for the 0.5B shape) the card
    idles, so the heads split into `parts` runs, each part's sums written to its own fp32 slice of
    (parts, b, l, G, N) and added after. parts: the largest divisor of the heads per group that keeps
    programs · parts ≤ GROUP_PROGRAMS."""
    parts = max(d for d in range(1, ratio + 1) if ratio % d == 0 and (d == 1 or programs * d <= GROUP_PROGRAMS))
    if parts == 1:
        return torch.empty(like.shape, device=like.device, dtype=like.dtype), 1, 0
    out = torch.empty(parts, *like.shape, device=like.device, dtype=torch.float32)
    return out, parts, out[0].numel()


# ---------------------------------------------------------------- the twin of ref.ssd_scan_ref


class _SSDScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus, dt_limit):
        y, final, dt_c, cum, states = ssd_forward(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit,
                                                  initial_states, seq_idx)  # fmt: skip
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, initial_states, seq_idx, dt_c, cum, states)
        ctx.options = chunk_size, dt_softplus, dt_limit
        ctx.mark_non_differentiable(dt_c, cum, states)
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, dt_bias, initial_states, seq_idx, dt_c, cum, states = ctx.saved_tensors
        chunk_size, dt_softplus, dt_limit = ctx.options
        dy = torch.zeros_like(x) if dy is None else dy
        dx, ddt, dA, dB, dC, dD, dinit, ddt_bias = ssd_backward(
            dy, dfinal, x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx,
            dt_c, cum, states,
        )  # fmt: skip
        dinit = dinit.to(initial_states.dtype) if dinit is not None else None
        return dx, ddt, dA, dB, dC, dD, ddt_bias, dinit, None, None, None, None


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
             dt_softplus=False, dt_limit=NO_LIMIT, return_final_states=False):  # fmt: skip
    """`ref.ssd_scan_ref` on our kernels, differentiable in every tensor (the gate z in PyTorch after the scan)."""
    y, final = _SSDScan.apply(x, dt, A, B, C, D, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus,
                              tuple(dt_limit))  # fmt: skip
    if z is not None:
        y = (y.float() * torch.nn.functional.silu(z.float())).to(y.dtype)
    return (y, final) if return_final_states else y
