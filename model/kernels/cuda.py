"""Fast CUDA twins of the reference ops, each with the reference signature.

`available_ops(provider)` returns {op_name: (supplier, callable)} for what runs here; `get_ops` falls back to
`ref.py` for the rest. The provider is `model.settings.kernels`:
- "auto" / "triton": our Triton kernels (`state_update.py`, `gated_norm.py`, the SSD scan `ssd.py`); nothing to
  compile at install, triton comes with PyTorch's CUDA wheels. The conv runs the reference: ATen's depthwise conv
  eagerly, and under torch.compile (compiled layers, the compiled decode step) shifted multiply-adds that inductor
  fuses with the SiLU.
- "mamba-ssm": mamba-ssm's Triton kernels, and causal-conv1d's conv where installed.
The SSD scan is picked in one place, `_ssd_scan_for` ("auto": mamba-ssm's where installed, else ours). PyTorch's
flash varlen attention serves every provider.

Every import is guarded: this module imports on a CPU machine without triton, mamba-ssm or causal-conv1d.
mamba-ssm 2.3.0–2.3.2.post1: `import mamba_ssm` runs its package `__init__`, which needs the Mamba-1 CUDA
extension `selective_scan_cuda` (and the Mamba-3 stack) although every Mamba-2 op we use is pure Triton. When
that import fails we register the package without running its `__init__` and import the Triton modules
directly (`import_mamba_triton`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
import types
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from ..settings import settings
from .ref import _discretize_dt

logger = logging.getLogger("falcon_align.kernels")


def import_mamba_triton():
    """→ (ssd_combined, selective_state_update, layernorm_gated) modules, or None."""
    names = ("ssd_combined", "selective_state_update", "layernorm_gated")
    try:
        return tuple(importlib.import_module(f"mamba_ssm.ops.triton.{n}") for n in names)
    except ImportError as err:
        first_error = err
    spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
    if spec is None or not spec.submodule_search_locations:
        logger.info("mamba-ssm Triton kernels unavailable: %s", first_error)
        return None
    # register the package without running its __init__ (which needs selective_scan_cuda)
    for key in [k for k in sys.modules if k == "mamba_ssm" or k.startswith("mamba_ssm.")]:
        del sys.modules[key]
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__file__ = spec.origin
    sys.modules["mamba_ssm"] = package
    try:
        mods = tuple(importlib.import_module(f"mamba_ssm.ops.triton.{n}") for n in names)
    except ImportError as err:
        logger.info("mamba-ssm Triton kernels unavailable: %s (first: %s)", err, first_error)
        return None
    logger.info("mamba-ssm imported without its package __init__ (%s)", first_error)
    return mods


def _with_reference_signature(chunked, general, discretizes_dt=False):
    """The reference's signature over the chunked custom op (what the model runs) and `general`, a scan of the same
    signature for the rest (a gate z, no D). The mixer hands raw dt with dt_bias, softplus and its limit: an op that
    `discretizes_dt` does that inside its kernels (and returns d dt_bias); before the others it runs here, in
    PyTorch (fp32), where torch.compile fuses it with its neighbours."""

    def ssd_scan(
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
        dt_limit=(0.0, float("inf")),
        return_final_states=False,
    ):
        if seq_idx is not None:
            seq_idx = seq_idx.to(torch.int32).contiguous()
        if initial_states is not None:
            initial_states = initial_states.float()
        if z is None and D is not None:  # what the model runs: one op torch.compile sees through, no graph break
            if discretizes_dt:
                lo, hi = (float(v) for v in dt_limit)
                y, final = chunked(x, dt, A, B, C, D, initial_states, seq_idx, chunk_size, dt_bias, dt_softplus, lo, hi)
            else:
                dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit)
                y, final = chunked(x, dt, A, B, C, D, initial_states, seq_idx, chunk_size)
            return (y, final) if return_final_states else y
        return general(
            x,
            dt,
            A,
            B,
            C,
            chunk_size,
            D=D,
            z=z,
            dt_bias=dt_bias,
            initial_states=initial_states,
            seq_idx=seq_idx,
            dt_softplus=dt_softplus,
            dt_limit=tuple(dt_limit),
            return_final_states=return_final_states,
        )

    return ssd_scan


def _mamba_general_scan(ssd_combined):
    """mamba-ssm's `mamba_chunk_scan_combined` (an autograd.Function) with the final state in fp32."""

    def scan(*args, return_final_states=False, **kwargs):
        out = ssd_combined.mamba_chunk_scan_combined(*args, return_final_states=return_final_states, **kwargs)
        return (out[0], out[1].float()) if return_final_states else out

    return scan


def _ssd_scan(ssd_combined):
    """mamba-ssm's scan: its chunked kernels as our custom op, `mamba_chunk_scan_combined` for the rest."""
    return _with_reference_signature(_chunked_scan_op("mamba-ssm"), _mamba_general_scan(ssd_combined))


def _triton_ssd_scan():
    """Our scan (model/kernels/ssd.py): its kernels as our custom op, `ssd.ssd_scan` (dt discretised in the kernel)
    for the rest."""
    from .ssd import ssd_scan

    return _with_reference_signature(_chunked_scan_op("triton"), ssd_scan, discretizes_dt=True)


_SCAN_OPS: dict[str, Callable] = {}
# rows this long or longer recompute the chunk states in the backward (mamba-ssm's backward): long rows scan in
# segments (model/modeling.py SCAN_SEGMENT_TOKENS) under activation checkpointing, and kept states would add up
# over a layer's segments — ~3 GiB for the 7B at 256K tokens
KEEP_STATES_BELOW_TOKENS = 32768


def _chunked_scan_op(provider: str = "mamba-ssm"):
    """The chunked SSD kernels of `provider` ("mamba-ssm" or "triton") as one `torch.library` custom op with its own
    backward (registered once each; the same signatures, ours named `ssd_scan_triton`, whose kept CB is empty).

    Why not `mamba_chunk_scan_combined`: (1) it is a Python autograd.Function that torch.compile cannot trace, so a
    compiled layer broke into four graphs around it and its ~20 eager kernels (grad adds, copies, casts) ran
    between them; an opaque custom op with a fake (shape) implementation keeps the layer one graph. (2) Its
    backward recomputes the chunk cumsum, CB, the chunk states and the state passing; here the forward keeps them
    (the states in the input dtype, as the forward's output kernel reads them) — per layer (l/chunk)·H·P·N
    elements, 50 MB for 1.5B-Deep at 8K — for rows under KEEP_STATES_BELOW_TOKENS. The one numerical difference
    from mamba-ssm's backward: the state-passing backward reads those bf16 states where mamba-ssm recomputes fp32
    ones (the chunk-end term of dA and ddt). model.settings.ssd_recompute: mamba-ssm's own backward for every row.
    Kernels only: the reference twin is `ref.ssd_scan_ref`, and the GPU tests hold the two together."""
    if provider not in _SCAN_OPS:
        ops = (_scan_forward_op(), _scan_backward_op()) if provider == "mamba-ssm" else _triton_scan_ops()
        forward, backward = ops
        forward.register_autograd(partial(_scan_backward, backward), setup_context=_scan_setup_context)
        _SCAN_OPS[provider] = partial(_chunked_scan, forward)
    return _SCAN_OPS[provider]


def _chunked_scan(forward, x, dt, A, B, C, D, initial_states, seq_idx, chunk_size, *discretize):
    """discretize: (dt_bias, dt_softplus, dt_min, dt_max) for an op that discretises raw dt (ours), else empty."""
    keep = not settings().ssd_recompute and x.shape[1] < KEEP_STATES_BELOW_TOKENS  # read per call
    y, final, *_ = forward(x, dt, A, B, C, D, initial_states, seq_idx, chunk_size, keep, *discretize)
    return y, final


def _scan_forward_op():
    """The forward custom op and its fake (shape) implementation."""
    from mamba_ssm.ops.triton import ssd_bmm, ssd_chunk_scan, ssd_chunk_state, ssd_state_passing

    @torch.library.custom_op("falcon_align::ssd_chunk_scan", mutates_args=())
    def ssd_fwd(
        x: Tensor,
        dt: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor,
        initial_states: Tensor | None,
        seq_idx: Tensor | None,
        chunk_size: int,
        keep: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """→ y (b, l, H, P), final state (b, H, P, N) fp32, and for the backward (empty unless `keep`): dA_cumsum
        and the chunked dt (b, H, c, chunk) fp32, the state entering each chunk (b, c, H, P, N) in C's dtype, CB
        (b, c, G, chunk, chunk) fp32."""
        P, N = x.shape[-1], B.shape[-1]
        dA_cumsum, dt_c = ssd_chunk_state._chunk_cumsum_fwd(dt, A, chunk_size)
        states = ssd_chunk_state._chunk_state_fwd(B, x, dt_c, dA_cumsum, seq_idx=seq_idx, states_in_fp32=True)
        states, final = ssd_state_passing._state_passing_fwd(
            states.flatten(-2),
            dA_cumsum[:, :, :, -1],
            initial_states=None if initial_states is None else initial_states.flatten(-2),
            seq_idx=seq_idx,
            chunk_size=chunk_size,
            out_dtype=C.dtype,
        )
        states = states.unflatten(-1, (P, N))  # (b, c, H, P, N)
        CB = ssd_bmm._bmm_chunk_fwd(C, B, chunk_size, seq_idx=seq_idx, output_dtype=torch.float32)
        y, _ = ssd_chunk_scan._chunk_scan_fwd(CB, x, dt_c, dA_cumsum, C, states, D=D, seq_idx=seq_idx)
        if not keep:  # four distinct placeholders: a custom op's outputs may not alias each other
            dA_cumsum, dt_c, states, CB = (x.new_empty(0, dtype=torch.float32) for _ in range(4))
        outs = y, final.unflatten(-1, (P, N)), dA_cumsum, dt_c, states, CB
        return tuple(t.contiguous() for t in outs)  # the layout the fake below promises

    ssd_fwd.register_fake(partial(_scan_forward_fake, keeps_cb=True))

    return ssd_fwd


def _scan_backward_op():
    """The backward custom op (its own op, so compiled backward graphs keep it opaque) and its fake."""
    from mamba_ssm.ops.triton import ssd_combined

    @torch.library.custom_op("falcon_align::ssd_chunk_scan_backward", mutates_args=())
    def ssd_bwd(
        dy: Tensor,
        dfinal: Tensor | None,
        x: Tensor,
        dt: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor,
        initial_states: Tensor | None,
        seq_idx: Tensor | None,
        y: Tensor,
        dA_cumsum: Tensor,
        dt_c: Tensor,
        states: Tensor,
        CB: Tensor,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """→ dx, ddt, dA, dB, dC, dD, d initial states (empty when there are none). dfinal None: the final state
        took no gradient. Without kept chunk states (`states` empty): mamba-ssm's backward, which recomputes them."""
        if states.numel() == 0:
            grads = ssd_combined._mamba_chunk_scan_combined_bwd(
                dy, x, dt, A, B, C, y, chunk_size, D=D, initial_states=initial_states, dfinal_states=dfinal,
                seq_idx=seq_idx,
            )  # fmt: skip
            dx, ddt, dA, dB, dC, dD, _, _, dinit = grads
        else:
            dx, ddt, dA, dB, dC, dD, dinit = _ssd_backward(
                dy.contiguous(), dfinal, x, dt, A, B, C, D, initial_states, seq_idx, dA_cumsum, dt_c, states, CB
            )
        # dinit comes in the input dtype (the kernel's dstates dtype); the custom op promises the state's own
        dinit = dinit.to(initial_states.dtype) if dinit is not None else x.new_empty(0, dtype=torch.float32)
        grads = dx, ddt, dA.to(A.dtype), dB, dC, dD.to(D.dtype), dinit
        return tuple(g.contiguous() for g in grads)  # the kernels' outputs follow their inputs' strides at times

    ssd_bwd.register_fake(_scan_backward_fake)
    return ssd_bwd


def _scan_forward_fake(x, dt, A, B, C, D, initial_states, seq_idx, chunk_size, keep, *discretize, keeps_cb):
    """Shapes of a scan forward op's outputs: y, the final state and, when `keep`, dA_cumsum, dt (b, H, c, chunk),
    the chunk states (b, c, H, P, N) and CB (b, c, G, chunk, chunk) if `keeps_cb`; empty placeholders otherwise."""
    b, l, H, P = x.shape
    G, N = B.shape[-2:]
    c = (l + chunk_size - 1) // chunk_size
    f32 = dict(dtype=torch.float32, device=x.device)
    y, final = x.new_empty(b, l, H, P), x.new_empty(b, H, P, N, dtype=torch.float32)
    if not keep:
        return (y, final, *(x.new_empty(0, **f32) for _ in range(4)))
    cb = x.new_empty(b, c, G, chunk_size, chunk_size, **f32) if keeps_cb else x.new_empty(0, **f32)
    chunked = (x.new_empty(b, H, c, chunk_size, **f32) for _ in range(2))
    return (y, final, *chunked, x.new_empty(b, c, H, P, N, dtype=C.dtype), cb)


def _scan_backward_fake(dy, dfinal, x, dt, A, B, C, D, initial_states, seq_idx, y, dA_cumsum, dt_c, states, CB,
                        chunk_size, *discretize):  # fmt: skip
    """Shapes of a scan backward op's outputs: each gradient like its input (contiguous, whatever the input's
    strides), d initial states empty when there are none; after them d dt_bias for an op that discretises dt
    (empty without a bias)."""
    like = lambda t: t.new_empty(t.shape)  # noqa: E731
    empty = x.new_empty(0, dtype=torch.float32)
    dinit = like(initial_states) if initial_states is not None else empty
    grads = like(x), like(dt), like(A), like(B), like(C), like(D), dinit
    if not discretize:
        return grads
    # its own placeholder: a custom op's outputs may not alias each other (d initial states may be `empty`)
    return (*grads, like(discretize[0]) if discretize[0] is not None else x.new_empty(0, dtype=torch.float32))


def _triton_scan_ops():
    """Our kernels (model/kernels/ssd.py) as the forward and backward custom ops, the signatures of mamba-ssm's pair
    above. The forward keeps dA_cumsum, dt and the chunk states when `keep`; CB is never kept (the kernels compute
    C·Bᵀ in place), so it is always the empty placeholder; without kept states the backward recomputes them."""
    from . import ssd

    @torch.library.custom_op("falcon_align::ssd_scan_triton", mutates_args=())
    def ssd_fwd(
        x: Tensor,
        dt: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor,
        initial_states: Tensor | None,
        seq_idx: Tensor | None,
        chunk_size: int,
        keep: bool,
        dt_bias: Tensor | None,
        dt_softplus: bool,
        dt_min: float,
        dt_max: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """mamba-ssm's forward op's outputs; dt raw, discretised in the kernels (bias, softplus, [dt_min, dt_max])."""
        y, final, dt_c, dA_cumsum, states = ssd.ssd_forward(
            x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, (dt_min, dt_max), initial_states, seq_idx,
            states_dtype=C.dtype,
        )  # fmt: skip
        if not keep:
            dA_cumsum, dt_c, states = (x.new_empty(0, dtype=torch.float32) for _ in range(3))
        return y, final, dA_cumsum, dt_c, states, x.new_empty(0, dtype=torch.float32)

    ssd_fwd.register_fake(partial(_scan_forward_fake, keeps_cb=False))

    @torch.library.custom_op("falcon_align::ssd_scan_triton_backward", mutates_args=())
    def ssd_bwd(
        dy: Tensor,
        dfinal: Tensor | None,
        x: Tensor,
        dt: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor,
        initial_states: Tensor | None,
        seq_idx: Tensor | None,
        y: Tensor,
        dA_cumsum: Tensor,
        dt_c: Tensor,
        states: Tensor,
        CB: Tensor,
        chunk_size: int,
        dt_bias: Tensor | None,
        dt_softplus: bool,
        dt_min: float,
        dt_max: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """mamba-ssm's backward op's gradients, ddt for the raw dt, then d dt_bias (empty without a bias)."""
        kept = dict(dt_c=dt_c, cum=dA_cumsum, states=states) if states.numel() else {}
        dx, ddt, dA, dB, dC, dD, dinit, dbias = ssd.ssd_backward(
            dy, dfinal, x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, (dt_min, dt_max), initial_states,
            seq_idx, **kept,
        )  # fmt: skip
        empty = x.new_empty(0, dtype=torch.float32)
        dinit = dinit.to(initial_states.dtype) if dinit is not None else empty
        return dx, ddt, dA, dB, dC, dD, dinit, dbias if dbias is not None else empty.clone()

    ssd_bwd.register_fake(_scan_backward_fake)
    return ssd_fwd, ssd_bwd


def _scan_setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, initial_states, seq_idx, chunk_size, _, *discretize = inputs
    y, _, dA_cumsum, dt_c, states, CB = output
    ctx.chunk_size, ctx.dt_options = chunk_size, tuple(discretize[1:])  # (dt_softplus, dt_min, dt_max) or ()
    ctx.save_for_backward(x, dt, A, B, C, D, initial_states, seq_idx, y, dA_cumsum, dt_c, states, CB, *discretize[:1])
    # the kept chunk quantities take no gradient: no zero-filled gradients for them, nor for an unused final state
    ctx.mark_non_differentiable(dA_cumsum, dt_c, states, CB)
    ctx.set_materialize_grads(False)


def _scan_backward(ssd_bwd, ctx, dy, dfinal, *_unused):
    x, dt, A, B, C, D, initial_states, seq_idx, y, dA_cumsum, dt_c, states, CB, *bias = ctx.saved_tensors
    dy = torch.zeros_like(y) if dy is None else dy
    dx, ddt, dA, dB, dC, dD, dinit, *dbias = ssd_bwd(
        dy, dfinal, x, dt, A, B, C, D, initial_states, seq_idx, y, dA_cumsum, dt_c, states, CB, ctx.chunk_size,
        *bias, *ctx.dt_options,
    )  # fmt: skip
    grads = dx, ddt, dA, dB, dC, dD, (dinit if initial_states is not None else None), None, None, None
    if not bias:  # an op over discretised dt
        return grads
    return (*grads, dbias[0] if bias[0] is not None else None, None, None, None)


def _ssd_backward(dy, dfinal, x, dt, A, B, C, D, init, seq_idx, dA_cumsum, dt_c, states, CB):
    """The SSD backward from the forward's saved chunk quantities (no recompute). Shapes: x, dy (b, l, H, P); dt
    (b, l, H) fp32; B, C (b, l, G, N); dA_cumsum, dt_c (b, H, c, chunk); states (b, c, H, P, N): the state
    entering each chunk; CB (b, c, G, chunk, chunk). The kernels are mamba-ssm's; the order is the chain rule:
    d states from y, back through the state passing, then dx / dB / dC / dCB and the dA_cumsum terms."""
    from mamba_ssm.ops.triton import ssd_bmm as bmm
    from mamba_ssm.ops.triton import ssd_chunk_scan as scan
    from mamba_ssm.ops.triton import ssd_chunk_state as state
    from mamba_ssm.ops.triton import ssd_combined as combined
    from mamba_ssm.ops.triton import ssd_state_passing as passing

    G = B.shape[-2]
    # d(state entering each chunk) from y = C·state·exp(dA_cumsum) + ... (fp32)
    dstates = scan._chunk_scan_bwd_dstates(C, dA_cumsum, dy, seq_idx=seq_idx, dtype=torch.float32)
    dstates, ddA_chunk_end, dinit, states_x = passing._state_passing_bwd(
        states.flatten(-2),
        dA_cumsum[:, :, :, -1],
        dstates.flatten(-2),
        dfinal_states=None if dfinal is None else dfinal.flatten(-2),
        seq_idx=seq_idx,
        has_initial_states=init is not None,
        dstates_dtype=x.dtype,
        states_dtype=x.dtype,
        chunk_size=dA_cumsum.shape[-1],
    )  # dstates: d(each chunk's own end state), the input dtype
    states_x, dstates = states_x.unflatten(-1, states.shape[-2:]), dstates.unflatten(-1, states.shape[-2:])
    dinit = None if dinit is None else dinit.unflatten(-1, states.shape[-2:])
    dx, ddt, dD = combined._chunk_scan_chunk_state_bwd_dx(x, dt_c, dA_cumsum, B, CB, dy, dstates, D=D, seq_idx=seq_idx)
    dB, ddA_next = state._chunk_state_bwd_db(x, dt_c, dA_cumsum, dstates, seq_idx=seq_idx, B=B, ngroups=G)
    dC, ddA_prev = scan._chunk_scan_bwd_dC(states_x, dA_cumsum, dy, seq_idx=seq_idx, C=C, ngroups=G)
    dCB = scan._chunk_scan_bwd_dcb(x, dt_c, dA_cumsum, dy, seq_idx=seq_idx, ngroups=G).to(CB.dtype)
    dB = bmm._bmm_chunk_bwd(C, dCB, residual=dB)  # + the intra-chunk C·Bᵀ terms
    dC = bmm._bmm_chunk_bwd(B, dCB.transpose(-1, -2), residual=dC)
    # d dA_cumsum: the chunk-end term joins the readout term as a reverse cumsum; plus the intra-chunk terms
    ddA_prev[..., -1] += ddA_chunk_end
    ddA = scan._chunk_scan_bwd_ddAcs_stable(x, dt_c, dA_cumsum, dy, CB)
    ddA += ddA_next + ddA_prev.flip([-1]).cumsum(dim=-1).flip([-1])
    ddt_in, dA, _ = state._chunk_cumsum_bwd(ddA, ddt, dt, A)
    return dx, ddt_in, dA, dB, dC, dD, dinit


def _mamba_state_update(ssu):
    update = ssu.selective_state_update

    def selective_state_update(
        state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf"))
    ):
        if tuple(dt_limit) != (0.0, float("inf")):  # the kernel has no limit: discretise here (bias, softplus, clamp)
            dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit)  # fp32: the kernel reads it as fp32 anyway
            dt_bias, dt_softplus = None, False
        h, p = x.shape[1], x.shape[2]
        n = state.shape[-1]
        # the kernel reads dt_bias's and D's strides unconditionally (2.3.2.post1 raises a TypeError on D=None)
        if dt_bias is None:
            dt_bias = torch.zeros(h, device=x.device, dtype=torch.float32)
        if D is None:
            D = torch.zeros(h, device=x.device, dtype=torch.float32)
        # the Triton kernel takes per-(head, channel) parameters: broadcast ours over P (views, no copies)
        return update(
            state,
            x,
            dt[..., None].expand(-1, -1, p),
            A.float()[:, None, None].expand(h, p, n),
            B,
            C,
            D=D[:, None].expand(h, p),
            z=z,
            dt_bias=dt_bias[:, None].expand(h, p),
            dt_softplus=dt_softplus,
        )

    return selective_state_update


def _mamba_rmsnorm_gated(layernorm_gated):
    fn = layernorm_gated.rmsnorm_fn

    def rmsnorm_gated(x, z, weight, eps, group_size, norm_before_gate=False):
        shape = x.shape
        y = fn(
            x.reshape(-1, shape[-1]),
            weight,
            None,
            z=None if z is None else z.reshape(-1, shape[-1]),
            eps=eps,
            group_size=group_size,
            norm_before_gate=norm_before_gate,
        )
        return y.view(shape)

    return rmsnorm_gated


def _varlen_attention():
    """PyTorch's own flash-attention varlen entry point (torch ≥ 2.9), adapted to our signature."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters

    from .ref import varlen_attention_ref

    def varlen_attention(q, k, v, cu_seqlens, max_len, scale):
        # q (T, H, D); k, v (T, KV, D); causal within each document. Flash runs fp16/bf16 only.
        if q.dtype not in (torch.float16, torch.bfloat16):
            return varlen_attention_ref(q, k, v, cu_seqlens, max_len, scale)
        kw = {}
        if "enable_gqa" in params:
            kw["enable_gqa"] = k.shape[1] != q.shape[1]
        elif k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if "is_causal" in params:
            kw["is_causal"] = True
        else:
            kw["window_size"] = (-1, 0)
        if "scale" in params:
            kw["scale"] = scale
        elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
            raise NotImplementedError("varlen_attn without a scale argument")
        cu = cu_seqlens.to(torch.int32)
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)

    return varlen_attention


def available_ops(provider: str) -> dict[str, tuple[str, Callable]]:
    """{op name: (supplier, callable)} of the fast ops `provider` ("auto", "triton", "mamba-ssm") supplies here;
    empty without CUDA. An explicit provider that cannot run here is an error; "auto" takes what imports."""
    if not torch.cuda.is_available():
        return {}
    ops = _mamba_ops() if provider == "mamba-ssm" else _triton_ops(required=provider == "triton")
    scan = _ssd_scan_for(provider)
    if scan is not None:
        ops["ssd_scan"] = scan
    attention = _varlen_attention()
    if attention is not None:
        ops["varlen_attention"] = ("torch", attention)
    return ops


def _ssd_scan_for(provider: str) -> tuple[str, Callable] | None:
    """The one place that picks the SSD scan → (supplier, scan), or None for the reference. "triton": ours
    (model/kernels/ssd.py); "mamba-ssm": mamba-ssm's; "auto": mamba-ssm's where it imports (on an H200 ours takes
    1.7–2.4× its time: `python -m bench ssd-op`, docs/performance.md), else ours."""
    from .ssd import available

    mamba = import_mamba_triton() if provider in ("auto", "mamba-ssm") else None
    if mamba is not None:
        return "mamba-ssm", _ssd_scan(mamba[0])
    if provider in ("auto", "triton") and available():
        return "triton", _triton_ssd_scan()
    return None


def _triton_ops(required: bool) -> dict[str, tuple[str, Callable]]:
    """Our Triton kernels: the decode step's state update and the gated RMSNorm."""
    try:
        from .gated_norm import rmsnorm_gated
        from .state_update import selective_state_update
    except ImportError as err:
        if required:
            raise RuntimeError(
                f"kernels='triton' but triton does not import here ({err}); install PyTorch's CUDA build (it brings "
                "triton) or `pip install triton`, or choose kernels='auto' or 'reference'"
            ) from err
        logger.info("falcon-align Triton kernels unavailable: %s", err)
        return {}
    return {
        "selective_state_update": ("triton", selective_state_update),
        "rmsnorm_gated": ("triton", rmsnorm_gated),
    }


def _mamba_ops() -> dict[str, tuple[str, Callable]]:
    """mamba-ssm's state update and gated RMSNorm, and causal-conv1d's conv where it is installed."""
    mamba = import_mamba_triton()
    if mamba is None:
        raise RuntimeError(
            "kernels='mamba-ssm' but mamba-ssm's Triton kernels do not import here (the falcon_align.kernels log "
            "says why); install them (`pip install \".[mamba]\"`) or choose kernels='auto'"
        )
    _, ssu, layernorm_gated = mamba
    ops = {
        "selective_state_update": ("mamba-ssm", _mamba_state_update(ssu)),
        "rmsnorm_gated": ("mamba-ssm", _mamba_rmsnorm_gated(layernorm_gated)),
    }
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except ImportError as err:
        logger.info("causal-conv1d unavailable (%s): the reference conv runs", err)
        return ops
    ops["causal_conv1d"] = ("causal-conv1d", _causal_conv1d(causal_conv1d_fn))
    ops["causal_conv1d_update"] = (
        "causal-conv1d",
        lambda x, s, w, b=None, activation=None: causal_conv1d_update(x, s, w, b, activation=activation),
    )
    return ops


def _causal_conv1d(causal_conv1d_fn):
    from .ref import causal_conv1d_ref

    def causal_conv1d(
        x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False, activation=None
    ):
        # causal-conv1d cannot combine seq_idx with initial states; that case (packed + cache) never occurs. Under
        # torch.compile: the reference's shifted multiply-adds, which inductor fuses (causal-conv1d breaks the graph)
        if initial_states is not None or return_final_states or torch.compiler.is_compiling():
            return causal_conv1d_ref(x, weight, bias, seq_idx, initial_states, return_final_states, activation)
        return causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx, activation=activation)

    return causal_conv1d
