"""Pure-PyTorch reference ops: the CPU path, the fallback on every device, and the oracle for fast kernels.

Signatures follow mamba_ssm / causal-conv1d where those exist so that a fast kernel is a drop-in twin.
Documents packed in one row are separated by `seq_idx` (b, l): an integer document index per token that is
non-decreasing along the row. Nothing crosses a change of `seq_idx`: not the SSM state, not a conv tap.
Recurrent states are kept and returned in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_NO_LIMIT = (0.0, math.inf)


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """a (..., T) → (..., T, T) with out[..., i, j] = sum(a[..., j+1 : i+1]) for j <= i, -inf above the diagonal.

    Built from a masked cumsum rather than differences of cumsums, so it is exact and never 0 · inf.
    """
    T = a.size(-1)
    a = a[..., None].expand(*a.shape, T)  # (..., T(i), T(j)) holding a[i]
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    out = a.masked_fill(~strictly_lower, 0).cumsum(dim=-2)
    lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0)
    return out.masked_fill(~lower, -torch.inf)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _discretize_dt(dt, dt_bias, dt_softplus, dt_limit):
    dt = dt.to(_compute_dtype(dt))
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != _NO_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def ssd_scan_ref(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    dt_softplus=False,
    dt_limit=_NO_LIMIT,
    return_final_states=False,
):
    """Chunked SSD (Mamba-2) scan, exact evaluation of the per-head recurrence

        S_t = exp(dt_t · A) · S_{t-1} + dt_t · x_t ⊗ B_t,    y_t = S_t · C_t + D · x_t  (then · silu(z_t))

    x (b, l, h, p); dt (b, l, h); A (h,); B, C (b, l, g, n) with head i using group i // (h/g);
    D (h,); z like x; initial_states (b, h, p, n), the state before x[:, 0] (it belongs to the document of
    position 0); seq_idx (b, l). Returns y (b, l, h, p) in x.dtype [, final_states (b, h, p, n)]. Computes in
    fp32 (fp64 for fp64 inputs, so the oracle can be checked exactly).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    out_dtype = x.dtype
    cdt = _compute_dtype(x)
    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit).to(cdt)  # (b, l, h)
    x = x.to(cdt)
    B = B.to(cdt).repeat_interleave(h // g, dim=2)  # (b, l, h, n); groups are contiguous blocks of heads
    C = C.to(cdt).repeat_interleave(h // g, dim=2)
    skip = D.to(cdt)[:, None] * x if D is not None else None  # (b, l, h, p)

    pad = (-l) % chunk_size
    nc = (l + pad) // chunk_size

    def chunks(t):  # (b, l, ...) → (b, c, cs, ...) zero-padded: padded steps have dt=0 (no decay, no input)
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(b, nc, chunk_size, *t.shape[2:])

    xdt = chunks(x * dt[..., None])  # (b, c, cs, h, p)
    Adt = chunks(A.to(cdt) * dt).permute(0, 3, 1, 2)  # (b, h, c, cs)
    Bc, Cc = chunks(B), chunks(C)  # (b, c, cs, h, n)
    A_cum = Adt.cumsum(-1)  # (b, h, c, cs)

    if seq_idx is not None:
        s = F.pad(seq_idx, (0, pad), value=0)
        if pad:
            s[:, l:] = seq_idx[:, -1:]
        s = s.view(b, nc, chunk_size)  # (b, c, cs)
        # doc of each state the inter-chunk pass carries: the initial one, then each chunk's last position
        state_doc = torch.cat([s[:, :1, 0], s[:, :, -1]], dim=1)  # (b, c+1)

    # 1. within each chunk: y_l = sum_{s<=l} C_l·B_s · exp(A_cum_l - A_cum_s) · dt_s x_s
    decay = torch.exp(_segsum(Adt))  # (b, h, c, l, s)
    if seq_idx is not None:
        decay = decay * (s[:, None, :, :, None] == s[:, None, :, None, :])
    scores = torch.einsum("bclhn,bcshn->bclsh", Cc, Bc) * decay.permute(0, 2, 3, 4, 1)
    y_diag = torch.einsum("bclsh,bcshp->bclhp", scores, xdt)

    # 2. each chunk's own contribution to the state at its end
    decay_to_end = torch.exp(A_cum[..., -1:] - A_cum)  # (b, h, c, cs)
    if seq_idx is not None:
        decay_to_end = decay_to_end * (s == s[..., -1:])[:, None]
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_to_end, xdt)

    # 3. carry states across chunks (a scan over c+1 states, the initial one first)
    init = initial_states.to(cdt) if initial_states is not None else torch.zeros(b, h, p, n, dtype=cdt, device=x.device)
    states = torch.cat([init[:, None], chunk_states], dim=1)  # (b, c+1, h, p, n)
    carry = torch.exp(_segsum(F.pad(A_cum[..., -1], (1, 0))))  # (b, h, c+1 to, c+1 from)
    if seq_idx is not None:
        carry = carry * (state_doc[:, None, :, None] == state_doc[:, None, None, :])
    states = torch.einsum("bhzc,bchpn->bzhpn", carry, states)
    start_states, final_states = states[:, :-1], states[:, -1]  # (b, c, h, p, n), (b, h, p, n)

    # 4. the state entering each chunk, read out by C with the decay since the chunk start
    decay_from_start = torch.exp(A_cum)  # (b, h, c, cs)
    if seq_idx is not None:
        decay_from_start = decay_from_start * (s == state_doc[:, :-1, None])[:, None]
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, start_states, decay_from_start)

    y = (y_diag + y_off).reshape(b, nc * chunk_size, h, p)[:, :l]
    if skip is not None:
        y = y + skip
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(out_dtype)
    return (y, final_states) if return_final_states else y


def causal_conv1d_ref(
    x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False, activation=None
):
    """Depthwise causal conv. x (b, d, l); weight (d, k); bias (d,); initial_states (b, d, k-1): the raw
    inputs before x[..., 0] (they belong to the document of position 0); seq_idx (b, l) masks every tap
    that reaches into another document. Returns y (b, d, l) [, final_states (b, d, k-1): last raw inputs].

    Two forms, the same sums: ATen's depthwise conv (one kernel each way) for a plain row in eager mode; k shifted
    multiply-adds where documents are packed, and under torch.compile, where inductor fuses the taps, the SiLU and
    the layout changes around them into one kernel (ATen's depthwise conv was 11% of a compiled 0.5B step at 8K on
    an H100, its layout copies 3% more)."""
    b, d, l = x.shape
    k = weight.shape[-1]
    w, bias_x = weight.to(x.dtype), (bias.to(x.dtype) if bias is not None else None)
    # the raw inputs with the k-1 before the row: the initial states, or zeros (then ATen pads, or F.pad)
    xp = None if initial_states is None else torch.cat([initial_states.to(x.dtype), x], dim=-1)  # (b, d, k-1+l)
    if seq_idx is None and not torch.compiler.is_compiling():  # ATen's depthwise conv
        if xp is None:
            y = F.conv1d(x, w.unsqueeze(1), bias_x, padding=k - 1, groups=d)[..., :l]
        else:
            y = F.conv1d(xp, w.unsqueeze(1), bias_x, groups=d)
    else:  # taps over (b, k-1+l, d) memory: the products, the sum and y keep that layout, so y.transpose(1, 2) —
        # the mixer's x, B, C — is contiguous for the scan (channels-first, the scan kernels read x, B and C with
        # strided loads)
        xp = F.pad(x.transpose(1, 2), (0, 0, k - 1, 0)).transpose(1, 2) if xp is None else xp
        y = _conv_taps(xp, w, l, seq_idx)
        y = y if bias_x is None else y + bias_x[:, None]
    if activation in ("silu", "swish"):
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if not return_final_states:
        return y
    tail = F.pad(x[..., -(k - 1) :], (max(0, k - 1 - l), 0)) if xp is None else xp[..., -(k - 1) :]
    return y, tail.clone()


def _conv_taps(xp, w, l, seq_idx=None):
    """sum_j w[:, j] · xp[..., j : j+l]: tap j reads x[t - (k-1) + j]; with seq_idx (b, l) a tap that reaches
    into another document is dropped. xp (b, d, k-1+l) → (b, d, l)."""
    k = w.size(-1)
    if seq_idx is not None:
        s_pad = torch.cat([seq_idx[:, :1].expand(seq_idx.size(0), k - 1), seq_idx], dim=-1)  # (b, k-1+l)
    y = None
    for j in range(k):
        tap = w[:, j, None] * xp[..., j : j + l]
        if seq_idx is not None:
            tap = tap * (s_pad[:, j : j + l] == seq_idx).to(xp.dtype)[:, None]  # (b, 1, l): same document
        y = tap if y is None else y + tap
    return y


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None):
    """One decode step. x (b, d); conv_state (b, d, k-1) raw inputs, shifted in place. Returns y (b, d)."""
    window = torch.cat([conv_state, x[..., None].to(conv_state.dtype)], dim=-1)  # (b, d, k)
    conv_state.copy_(window[..., 1:])
    y = (window.to(x.dtype) * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return F.silu(y) if activation in ("silu", "swish") else y


def selective_state_update_ref(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=_NO_LIMIT
):
    """One recurrence step; `state` (b, h, p, n) fp32 is updated in place.
    x (b, h, p); dt (b, h); A (h,); B, C (b, g, n); D (h,); z (b, h, p). Returns y (b, h, p) in x.dtype.
    """
    h = x.shape[1]
    g = B.shape[1]
    cdt = torch.promote_types(_compute_dtype(x), state.dtype)
    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit).to(cdt)  # (b, h)
    B = B.to(cdt).repeat_interleave(h // g, dim=1)  # (b, h, n)
    C = C.to(cdt).repeat_interleave(h // g, dim=1)
    xf = x.to(cdt)
    decay = torch.exp(dt * A.to(cdt))[..., None, None]  # (b, h, 1, 1)
    new_state = state.to(cdt) * decay + (dt[..., None] * xf)[..., None] * B[:, :, None, :]
    state.copy_(new_state)
    y = torch.einsum("bhpn,bhn->bhp", new_state, C)
    if D is not None:
        y = y + D.to(cdt)[:, None] * xf
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype)


def rmsnorm_gated_ref(x, z, weight, eps, group_size, norm_before_gate=False):
    """Gated group RMSNorm. x, z (..., d); weight (d,). norm_before_gate=False (Falcon-H1, Mamba-2):
    RMS-normalise x·silu(z) within each contiguous group of `group_size` channels; computed in fp32."""
    dtype = x.dtype
    xf = x.float()
    if z is not None and not norm_before_gate:
        xf = xf * F.silu(z.float())
    grouped = xf.view(*xf.shape[:-1], -1, group_size)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    y = grouped.view_as(xf) * weight.float()
    if z is not None and norm_before_gate:
        y = y * F.silu(z.float())
    return y.to(dtype)


def varlen_attention_ref(q, k, v, cu_seqlens, max_len, scale):
    """Causal attention within each document of a flattened packed batch.
    q (T, H, D); k, v (T, KV, D); cu_seqlens (docs+1,) document starts. Returns (T, H, D)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    gqa = k.shape[1] != q.shape[1]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            qd, kd, vd = (t[lo:hi].transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, n, D)
            od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=gqa)
            out[lo:hi] = od[0].transpose(0, 1)
    return out


def rmsnorm_ref(x, weight, eps):
    """Llama-style RMSNorm: normalise in fp32, cast back, then scale (the order HF uses)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)
