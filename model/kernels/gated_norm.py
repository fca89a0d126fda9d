"""Gated group RMSNorm, forward and backward, as Triton kernels. Its twin and oracle is `ref.rmsnorm_gated_ref`
(same signature, same semantics). Over each contiguous group of `group_size` channels of a row:

    norm_before_gate=False (Falcon-H1, Mamba-2):  u = x · silu(z),  y = u · rstd(u) · w
    norm_before_gate=True:                        u = x,            y = u · rstd(u) · w · silu(z)
    rstd(u) = 1 / sqrt(mean(u²) + eps)

The op is a `torch.library` custom op with its own backward (a second op), so torch.compile keeps it opaque and
CUDA graphs capture it as it is. The forward keeps rstd (rows, groups) fp32; the backward recomputes u from x and z.
Arithmetic is fp32 whatever the input dtypes. Imports triton: `cuda.py` imports this module only where triton does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# a group is one program's block: beyond this many channels it would not fit in registers
MAX_GROUP = 16384


@triton.jit
def _gated_norm_fwd_kernel(
    x_ptr, z_ptr, w_ptr, y_ptr, rstd_ptr,
    group_size, n_groups, eps,
    x_row, z_row, y_row,  # row strides of x, z, y (rows, d); channels are contiguous
    HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row, grp = tl.program_id(0), tl.program_id(1)
    c = grp * group_size + tl.arange(0, BLOCK)  # (BLOCK,) channels of this group
    ok = tl.arange(0, BLOCK) < group_size
    x = tl.load(x_ptr + row * x_row + c, mask=ok, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + row * z_row + c, mask=ok, other=0.0).to(tl.float32)
        gate = z * tl.sigmoid(z)
        if not NORM_BEFORE_GATE:
            x *= gate
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / group_size + eps)  # scalar
    tl.store(rstd_ptr + row * n_groups + grp, rstd)
    y = x * rstd * tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
    if HAS_Z:
        if NORM_BEFORE_GATE:
            y *= gate
    tl.store(y_ptr + row * y_row + c, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gated_norm_bwd_kernel(
    dy_ptr, x_ptr, z_ptr, w_ptr, rstd_ptr, dx_ptr, dz_ptr, dw_ptr,
    rows, group_size, n_groups, d,
    dy_row, x_row, z_row, dx_row, dz_row,  # row strides; channels are contiguous
    HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """One program: ROWS rows of one group. dx, dz per row; this program's share of dw into row
    `program_id(0)` of dw (programs, d) fp32, summed over programs by the caller.
    With n = u · rstd and g = dy · w (· silu(z) when the gate follows the norm):
        du = rstd · (g − n · mean(g · n))      (the RMSNorm backward within the group)
        dw = Σ_rows dy · n (· silu(z))
    and the gate's own terms: dz = du · x · silu'(z) before the norm, dy · w · n · silu'(z) after it."""
    pid, grp = tl.program_id(0), tl.program_id(1)
    c = grp * group_size + tl.arange(0, BLOCK)  # (BLOCK,)
    ok = tl.arange(0, BLOCK) < group_size
    w = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        live = ok & (row < rows)  # the last program's rows past the end read zeros: no share of dw
        x = tl.load(x_ptr + row * x_row + c, mask=live, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * dy_row + c, mask=live, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row * n_groups + grp, mask=row < rows, other=0.0)
        u = x
        if HAS_Z:
            z = tl.load(z_ptr + row * z_row + c, mask=live, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            gate = z * sig
            dgate = sig * (1.0 + z * (1.0 - sig))  # silu'(z)
            if not NORM_BEFORE_GATE:
                u = x * gate
        n = u * rstd  # the normalised group
        g = dy * w
        scaled = n
        if HAS_Z and NORM_BEFORE_GATE:  # y = n · w · silu(z)
            tl.store(dz_ptr + row * dz_row + c, (g * n * dgate).to(dz_ptr.dtype.element_ty), mask=live)
            scaled = n * gate
            g *= gate
        dw += dy * scaled
        du = rstd * (g - n * (tl.sum(g * n, axis=0) / group_size))
        if HAS_Z and not NORM_BEFORE_GATE:  # u = x · silu(z)
            tl.store(dz_ptr + row * dz_row + c, (du * x * dgate).to(dz_ptr.dtype.element_ty), mask=live)
            du *= gate
        tl.store(dx_ptr + row * dx_row + c, du.to(dx_ptr.dtype.element_ty), mask=live)
    tl.store(dw_ptr + pid * d + c, dw, mask=ok)


def _rows(t: Tensor) -> Tensor:
    """(..., d) → (rows, d) with contiguous channels: a view where the layout allows (a split of a wider projection
    is one), else a copy."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_opts(group_size: int) -> dict:
    """One group a program: its channels rounded up to a power of two, a warp for every 256 of them (1 … 16)."""
    block = triton.next_power_of_2(group_size)
    return dict(BLOCK=block, num_warps=min(max(block // 256, 1), 16))


@torch.library.custom_op("falcon_align::rmsnorm_gated", mutates_args=())
def _forward_op(
    x: Tensor, z: Tensor | None, weight: Tensor, eps: float, group_size: int, norm_before_gate: bool
) -> tuple[Tensor, Tensor]:
    """x, z (rows, d) → y (rows, d) in x's dtype, rstd (rows, d / group_size) fp32."""
    rows, d = x.shape
    n_groups = d // group_size
    y = x.new_empty(rows, d)
    rstd = x.new_empty(rows, n_groups, dtype=torch.float32)
    z_ = z if z is not None else x  # a stand-in pointer for an argument the kernel does not read
    _gated_norm_fwd_kernel[(rows, n_groups)](
        x, z_, weight, y, rstd, group_size, n_groups, eps, x.stride(0), z_.stride(0), y.stride(0),
        HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate, **_launch_opts(group_size),
    )  # fmt: skip
    return y, rstd


@_forward_op.register_fake
def _(x, z, weight, eps, group_size, norm_before_gate):
    rows, d = x.shape
    return x.new_empty(rows, d), x.new_empty(rows, d // group_size, dtype=torch.float32)


def _rows_per_program(rows: int, device: torch.device) -> int:
    """Rows one backward program takes, so that about four programs run a multiprocessor (each writes its share of
    dw once). A power of two and a compile-time constant: a handful of compiled variants, one per power of two."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return min(triton.next_power_of_2(triton.cdiv(rows, 4 * sms)), 1024)


@torch.library.custom_op("falcon_align::rmsnorm_gated_backward", mutates_args=())
def _backward_op(
    dy: Tensor, x: Tensor, z: Tensor | None, weight: Tensor, rstd: Tensor, group_size: int, norm_before_gate: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """→ dx (rows, d) in x's dtype, dz in z's dtype (empty without z), dw (d,) in weight's dtype."""
    rows, d = x.shape
    n_groups = d // group_size
    rows_per_program = _rows_per_program(rows, x.device)
    programs = triton.cdiv(rows, rows_per_program)
    dx = x.new_empty(rows, d)
    dz = z.new_empty(rows, d) if z is not None else x.new_empty(0)
    dw_parts = x.new_empty(programs, d, dtype=torch.float32)  # each program's share of dw, fp32
    z_, dz_ = (z, dz) if z is not None else (x, dx)  # stand-in pointers the kernel does not read
    _gated_norm_bwd_kernel[(programs, n_groups)](
        dy, x, z_, weight, rstd, dx, dz_, dw_parts,
        rows, group_size, n_groups, d,
        dy.stride(0), x.stride(0), z_.stride(0), dx.stride(0), dz_.stride(0),
        HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate, ROWS=rows_per_program,
        **_launch_opts(group_size),
    )  # fmt: skip
    return dx, dz, dw_parts.sum(0).to(weight.dtype)


@_backward_op.register_fake
def _(dy, x, z, weight, rstd, group_size, norm_before_gate):
    rows, d = x.shape
    dz = z.new_empty(rows, d) if z is not None else x.new_empty(0)
    return x.new_empty(rows, d), dz, weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, z, weight, _eps, group_size, norm_before_gate = inputs
    ctx.group_size, ctx.norm_before_gate = group_size, norm_before_gate
    ctx.save_for_backward(x, z, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _drstd):
    x, z, weight, rstd = ctx.saved_tensors
    dx, dz, dw = _backward_op(_rows(dy), x, z, weight, rstd, ctx.group_size, ctx.norm_before_gate)
    return dx, (dz if z is not None else None), dw, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def rmsnorm_gated(x, z, weight, eps, group_size, norm_before_gate=False) -> Tensor:
    """Gated group RMSNorm. x, z (..., d) (z may be None); weight (d,); groups of `group_size` contiguous channels.
    → y (..., d) in x's dtype. The twin of `ref.rmsnorm_gated_ref`; computes in fp32, differentiable in x, z and
    weight."""
    shape = x.shape
    d = shape[-1]
    if group_size > MAX_GROUP:
        raise ValueError(f"rmsnorm_gated: group_size {group_size} > {MAX_GROUP}, the most one Triton program holds")
    if d % group_size or weight.shape != (d,) or (z is not None and z.shape != shape):
        z_shape = None if z is None else tuple(z.shape)
        raise ValueError(
            f"rmsnorm_gated: x {tuple(shape)}, z {z_shape}, weight {tuple(weight.shape)}, "
            f"group_size {group_size}: expected x and z (..., d), weight (d,), group_size dividing d"
        )
    z = None if z is None else _rows(z)
    y, _ = _forward_op(_rows(x), z, weight.contiguous(), float(eps), group_size, norm_before_gate)
    return y.view(shape)
