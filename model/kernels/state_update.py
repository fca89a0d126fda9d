"""One Mamba-2 recurrence step for decoding, as a Triton kernel. Its twin and oracle is `ref.selective_state_update_ref`
(same signature, same semantics): the state (b, H, P, N) is updated in place and y (b, H, P) returned.

    dt' = clamp(softplus(dt + dt_bias))      (each part optional)
    S   = exp(dt' · A) · S + dt' · x ⊗ B     (B of the head's group)
    y   = S · C + D · x,  then · silu(z)

One program updates a tile of BLOCK_P channels of one (batch, head): it reads that tile of the state once, writes it
once, and reads B and C of the head's group. The arithmetic is fp32 whatever the input dtypes; y is cast to x's dtype
and the state written back in its own dtype. Imports triton: `cuda.py` imports this module only where triton does.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

_NO_LIMIT = (0.0, math.inf)


@triton.jit
def softplus(v):
    """F.softplus (v itself above 20) to a few fp32 ulps everywhere, with no log of a number near 1 (whose fast
    approximation loses the digits of small u): softplus(v) = max(v, 0) + log1p(u), u = exp(−|v|) in (0, 1], and
    log1p(u) = 2·atanh(s) = 2·(s + s³/3 + s⁵/5 + …) with s = u / (2 + u) ≤ 1/3, whose terms past s¹⁹ are below
    fp32's resolution."""
    u = tl.exp(-tl.abs(v))
    s = u / (2.0 + u)
    s2 = s * s
    series = 1.0 / 19.0
    for k in tl.static_range(9):  # Horner in s²: 1/17, 1/15, …, 1/1
        series = series * s2 + 1.0 / (17 - 2 * k)
    return tl.where(v > 20.0, v, tl.maximum(v, 0.0) + 2.0 * s * series)


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, y_ptr,
    H, P, N, heads_per_group, dt_min, dt_max,
    s_sb, s_sh, s_sp, s_sn,  # state (b, H, P, N)
    x_sb, x_sh, x_sp,  # x (b, H, P); z and y take their own strides below
    dt_sb, dt_sh,  # dt (b, H)
    B_sb, B_sg, B_sn,  # B (b, G, N)
    C_sb, C_sg, C_sn,  # C (b, G, N)
    z_sb, z_sh, z_sp,  # z (b, H, P)
    y_sb, y_sh, y_sp,  # y (b, H, P)
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_p, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    g = h // heads_per_group
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    p_ok, n_ok = p < P, n < N

    dt = tl.load(dt_ptr + b * dt_sb + h * dt_sh).to(tl.float32)  # scalar
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + h).to(tl.float32)
    if DT_SOFTPLUS:
        dt = softplus(dt)
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    decay = tl.exp(dt * tl.load(A_ptr + h).to(tl.float32))  # scalar

    x = tl.load(x_ptr + b * x_sb + h * x_sh + p * x_sp, mask=p_ok, other=0.0).to(tl.float32)  # (BLOCK_P,)
    B = tl.load(B_ptr + b * B_sb + g * B_sg + n * B_sn, mask=n_ok, other=0.0).to(tl.float32)  # (BLOCK_N,)
    C = tl.load(C_ptr + b * C_sb + g * C_sg + n * C_sn, mask=n_ok, other=0.0).to(tl.float32)  # (BLOCK_N,)
    s_ptrs = state_ptr + b * s_sb + h * s_sh + p[:, None] * s_sp + n[None, :] * s_sn  # (BLOCK_P, BLOCK_N)
    tile_ok = p_ok[:, None] & n_ok[None, :]
    S = tl.load(s_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    S = S * decay + (dt * x)[:, None] * B[None, :]
    tl.store(s_ptrs, S.to(state_ptr.dtype.element_ty), mask=tile_ok)

    y = tl.sum(S * C[None, :], axis=1)  # (BLOCK_P,)
    if HAS_D:
        y += tl.load(D_ptr + h).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + b * z_sb + h * z_sh + p * z_sp, mask=p_ok, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + b * y_sb + h * y_sh + p * y_sp, y.to(y_ptr.dtype.element_ty), mask=p_ok)


def _block_p(P: int, N: int) -> int:
    """Channels a program takes: a (BLOCK_P, BLOCK_N) fp32 tile of at most 4096 elements (16 KiB of registers over a
    4-warp program), and no more than P rounded up."""
    return max(1, min(triton.next_power_of_2(P), 4096 // triton.next_power_of_2(N)))


@torch.library.custom_op("falcon_align::selective_state_update", mutates_args=("state",))
def _state_update_op(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
) -> Tensor:
    """The kernel as an op that torch.compile keeps opaque (its in-place write to `state` declared), so a compiled
    decode step captured in a CUDA graph launches it as it is."""
    b, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    y = torch.empty_like(x)  # (b, H, P)
    z_ = z if z is not None else y  # a stand-in pointer for an argument the kernel does not read
    block_p = _block_p(P, N)
    grid = (triton.cdiv(P, block_p), b * H)
    _state_update_kernel[grid](
        state, x, dt, A, B, C, D if D is not None else A, z_, dt_bias if dt_bias is not None else A, y,
        H, P, N, H // G, dt_min, dt_max,
        *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *z_.stride(), *y.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
        HAS_LIMIT=(dt_min, dt_max) != _NO_LIMIT, BLOCK_P=block_p, BLOCK_N=triton.next_power_of_2(N),
    )  # fmt: skip
    return y


@_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max):
    return torch.empty_like(x)


def selective_state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=_NO_LIMIT
) -> Tensor:
    """One recurrence step; `state` (b, H, P, N) is updated in place. x (b, H, P); dt (b, H); A (H,); B, C (b, G, N)
    with head i reading group i // (H/G); D (H,); z (b, H, P); dt_bias (H,). → y (b, H, P) in x.dtype. The twin of
    `ref.selective_state_update_ref`; computes in fp32."""
    b, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    if state.shape != (b, H, P, N) or C.shape != B.shape or dt.shape != (b, H) or A.shape != (H,) or H % G:
        raise ValueError(
            f"selective_state_update: state {tuple(state.shape)}, x {tuple(x.shape)}, dt {tuple(dt.shape)}, "
            f"A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}: expected state (b, H, P, N), x (b, H, P), "
            "dt (b, H), A (H,), B and C (b, G, N) with G dividing H"
        )
    dt_min, dt_max = (float(v) for v in dt_limit)
    return _state_update_op(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max)
