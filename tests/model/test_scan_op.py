"""The scan's custom op (`model/kernels/cuda.py`) plumbing on CPU, over stand-ins for mamba-ssm's kernel helpers.

The stand-ins return tensors of the real helpers' shapes and dtypes (their numbers are the GPU tests' business:
`test_ssd_scan_*` in test_gpu.py). What this checks without a GPU: the op registers, its fake implementation agrees
with what it returns under a real torch.compile (inductor asserts sizes and strides), and gradients of the right
shape and dtype reach every input — with and without kept chunk states, initial states, packed documents and a
gradient on the final state — eagerly and compiled with dynamic lengths.
"""

import sys
import types

import pytest
import torch

from model.kernels import cuda

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="registers stand-in kernels; the GPU runs the real")


def _stand_ins():
    """mamba_ssm.ops.triton.{ssd_chunk_state, ssd_state_passing, ssd_bmm, ssd_chunk_scan, ssd_combined} look-alikes."""
    f32 = torch.float32

    def chunked(t, cs):  # (b, l, h) → (b, h, c, cs)
        b, l, h = t.shape
        return torch.nn.functional.pad(t.float(), (0, 0, 0, -l % cs)).view(b, -1, cs, h).permute(0, 3, 1, 2) + 0

    m = {name: types.ModuleType(f"mamba_ssm.ops.triton.{name}") for name in
         ("ssd_chunk_state", "ssd_state_passing", "ssd_bmm", "ssd_chunk_scan", "ssd_combined")}  # fmt: skip
    cs_mod, sp, bmm, scan, comb = (m[n] for n in m)
    cs_mod._chunk_cumsum_fwd = lambda dt, A, cs: (chunked(dt, cs).cumsum(-1) * A.mean(), chunked(dt, cs))
    cs_mod._chunk_state_fwd = lambda B, x, dt, dA, seq_idx=None, states_in_fp32=True: torch.ones(
        x.shape[0], dt.shape[2], x.shape[2], x.shape[3], B.shape[-1], dtype=f32
    )
    sp._state_passing_fwd = lambda s, dA, initial_states=None, seq_idx=None, chunk_size=None, out_dtype=None: (
        s.to(out_dtype),
        s[:, -1].float() + (0 if initial_states is None else initial_states),
    )
    bmm._bmm_chunk_fwd = lambda C, B, cs, seq_idx=None, output_dtype=None: torch.zeros(
        C.shape[0], -(-C.shape[1] // cs), C.shape[2], cs, cs, dtype=output_dtype
    )
    scan._chunk_scan_fwd = lambda CB, x, dt, dA, C, states, D=None, seq_idx=None: (x * D[:, None].to(x.dtype), None)
    scan._chunk_scan_bwd_dstates = lambda C, dA, dy, seq_idx=None, dtype=None: torch.zeros(
        dy.shape[0], dA.shape[2], dy.shape[2], dy.shape[3], C.shape[-1], dtype=dtype
    )

    def state_passing_bwd(states, dA_last, dstates, dfinal_states=None, seq_idx=None, has_initial_states=None,
                          dstates_dtype=None, states_dtype=None, chunk_size=None):  # fmt: skip
        dinit = dstates[:, 0].to(dstates_dtype) if has_initial_states else None  # the real one: dstates' dtype
        return dstates.to(dstates_dtype), torch.zeros_like(dA_last), dinit, states.to(states_dtype)

    sp._state_passing_bwd = state_passing_bwd
    comb._chunk_scan_chunk_state_bwd_dx = lambda x, dt, dA, B, CB, dy, dstates, D=None, seq_idx=None: (
        dy * D[:, None].to(dy.dtype),
        torch.zeros_like(dt),
        (dy.float() * x.float()).sum((0, 1, 3)),
    )
    cs_mod._chunk_state_bwd_db = lambda x, dt, dA, dstates, seq_idx=None, B=None, ngroups=1: (
        torch.zeros_like(B),
        torch.zeros_like(dA),
    )
    scan._chunk_scan_bwd_dC = lambda states, dA, dy, seq_idx=None, C=None, ngroups=1: (
        torch.zeros_like(C),
        torch.zeros_like(dA),
    )
    scan._chunk_scan_bwd_dcb = lambda x, dt, dA, dy, seq_idx=None, ngroups=1: torch.zeros(
        x.shape[0], dA.shape[2], ngroups, dA.shape[3], dA.shape[3]
    )
    bmm._bmm_chunk_bwd = lambda a, dout, residual=None, out=None: torch.zeros_like(a) + residual
    scan._chunk_scan_bwd_ddAcs_stable = lambda x, dt, dA, dy, CB: torch.zeros_like(dA)
    cs_mod._chunk_cumsum_bwd = lambda ddA, ddt, dt, A: (torch.ones_like(dt), torch.ones_like(A), None)

    def recompute_bwd(dy, x, dt, A, B, C, y, cs, D=None, initial_states=None, dfinal_states=None, seq_idx=None):
        dinit = None if initial_states is None else torch.zeros_like(initial_states).to(x.dtype)
        dD = (dy.float() * x.float()).sum((0, 1, 3))
        return dy * D[:, None].to(dy.dtype), torch.ones_like(dt), torch.ones_like(A), torch.zeros_like(B), \
            torch.zeros_like(C), dD, None, None, dinit  # fmt: skip

    comb.recompute_calls = 0

    def counted_recompute_bwd(*args, **kwargs):
        comb.recompute_calls += 1
        return recompute_bwd(*args, **kwargs)

    comb._mamba_chunk_scan_combined_bwd = counted_recompute_bwd
    comb.mamba_chunk_scan_combined = None  # the model's calls never reach mamba-ssm's autograd.Function
    return m


@pytest.fixture(scope="module")
def scan_op():
    """The op over the stand-ins. It stays registered for the session (torch.library registers a name once); on a
    CPU machine nothing else builds it."""
    saved = {k: v for k, v in sys.modules.items() if k.startswith("mamba_ssm")}
    mods = _stand_ins()
    package = types.ModuleType("mamba_ssm.ops.triton")
    for name, mod in mods.items():
        setattr(package, name, mod)
        sys.modules[f"mamba_ssm.ops.triton.{name}"] = mod
    sys.modules.update({"mamba_ssm": types.ModuleType("mamba_ssm"), "mamba_ssm.ops": types.ModuleType("mamba_ssm.ops"),
                        "mamba_ssm.ops.triton": package})  # fmt: skip
    try:
        yield cuda._chunked_scan_op()
    finally:
        for k in [k for k in sys.modules if k.startswith("mamba_ssm")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _inputs(l, packed, init, dtype=torch.bfloat16, b=1, h=4, p=8, g=1, n=16):
    gen = torch.Generator().manual_seed(l)
    x = torch.randn(b, l, h, p, generator=gen, dtype=dtype, requires_grad=True)
    dt = torch.rand(b, l, h, generator=gen, requires_grad=True)
    A = (-torch.rand(h, generator=gen)).requires_grad_()
    B = torch.randn(b, l, g, n, generator=gen, dtype=dtype, requires_grad=True)
    C = torch.randn(b, l, g, n, generator=gen, dtype=dtype, requires_grad=True)
    D = torch.randn(h, generator=gen, dtype=dtype, requires_grad=True)
    s0 = torch.randn(b, h, p, n, generator=gen, requires_grad=True) if init else None
    seq_idx = (torch.arange(l) >= l // 3).to(torch.int32)[None].expand(b, l).contiguous() if packed else None
    return x, dt, A, B, C, D, s0, seq_idx


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
@pytest.mark.parametrize("keep", [True, False], ids=["kept-states", "recompute"])
def test_scan_op_plumbing(scan_op, monkeypatch, compiled, keep):
    if not keep:
        monkeypatch.setattr(cuda, "KEEP_STATES_BELOW_TOKENS", 0)
    call = torch.compile(scan_op, backend="inductor", dynamic=True) if compiled else scan_op
    combined = sys.modules["mamba_ssm.ops.triton.ssd_combined"]
    combined.recompute_calls = 0
    for l, packed, init in ((40, False, False), (56, True, True), (72, True, False)):
        x, dt, A, B, C, D, s0, seq_idx = _inputs(l, packed, init)
        y, final = call(x, dt, A, B, C, D, s0, seq_idx, 16)
        assert (
            y.shape == x.shape and y.dtype == x.dtype and final.shape == (1, 4, 8, 16) and final.dtype == torch.float32
        )
        loss = y.float().sum() + (final.sum() if init else 0)  # an unused final state: no gradient comes back for it
        inputs = [t for t in (x, dt, A, B, C, D, s0) if t is not None]
        grads = torch.autograd.grad(loss, inputs)
        for t, gr in zip(inputs, grads):
            assert gr.shape == t.shape and gr.dtype == t.dtype
        torch.testing.assert_close(grads[0], D.detach()[:, None].expand_as(x).to(x.dtype))  # dy·D through dx
    assert combined.recompute_calls == (0 if keep else 3)  # which backward ran: the kept states', or mamba-ssm's


@pytest.mark.parametrize("keep", [True, False], ids=["kept-states", "recompute"])
def test_scan_ops_pass_opcheck(scan_op, keep):
    """torch.library.opcheck on both ops: schema, autograd registration, and the fake implementation against the real
    outputs (shapes, strides and dtypes — an initial-state gradient in the input's dtype once slipped past a
    compiled run's size and stride asserts)."""
    x, dt, A, B, C, D, s0, seq_idx = _inputs(40, True, True)
    args = (x, dt, A, B, C, D, s0, seq_idx, 16, keep)
    torch.library.opcheck(torch.ops.falcon_align.ssd_chunk_scan.default, args)
    with torch.no_grad():
        y, final, *kept = torch.ops.falcon_align.ssd_chunk_scan.default(*args)
    assert all(t.numel() > 0 for t in kept) == keep and all(t.numel() == 0 for t in kept) != keep
    plain = [t.detach() for t in (x, dt, A, B, C, D, s0)]
    backward_args = (torch.ones_like(y), torch.ones_like(final), *plain, seq_idx, y, *kept, 16)
    torch.library.opcheck(torch.ops.falcon_align.ssd_chunk_scan_backward.default, backward_args)


def test_the_model_signature_reaches_the_op(scan_op):
    """`get_ops("cuda").ssd_scan` as the mixer calls it (int64 seq_idx, a bf16 initial state, final states asked)."""
    ssd_scan = cuda._ssd_scan(sys.modules["mamba_ssm.ops.triton.ssd_combined"])
    x, dt, A, B, C, D, s0, seq_idx = _inputs(40, True, True)
    y, final = ssd_scan(x, dt, A, B, C, 16, D=D, initial_states=s0.to(torch.bfloat16), seq_idx=seq_idx.long(),
                        return_final_states=True)  # fmt: skip
    assert y.shape == x.shape and final.dtype == torch.float32
    assert ssd_scan(x, dt, A, B, C, 16, D=D).shape == x.shape


def test_scan_segments_never_keep_states():
    """Rows over SCAN_SEGMENT_TOKENS scan in segments under activation checkpointing; a full segment must take the
    recomputing backward, or kept states would add up over a layer's segments (the long-context memory plan)."""
    from model.modeling import SCAN_SEGMENT_TOKENS

    assert SCAN_SEGMENT_TOKENS >= cuda.KEEP_STATES_BELOW_TOKENS
