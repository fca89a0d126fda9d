"""Reference ops against a naive per-token recurrence in fp64 (fresh random inputs per case)."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import model.acceleration as acceleration
import model.modeling as modeling
from model.kernels import REFERENCE, get_ops
from model.kernels.ref import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    rmsnorm_gated_ref,
    selective_state_update_ref,
    ssd_scan_ref,
)
from tests.conftest import rel_err, tiny_model


def naive_scan(x, dt, A, B, C, D, seq_idx=None, init=None):
    """Token-by-token recurrence, fp64; the state resets where seq_idx changes."""
    b, l, h, p = x.shape
    g = B.shape[2]
    B = B.repeat_interleave(h // g, 2)
    C = C.repeat_interleave(h // g, 2)
    S = init.clone() if init is not None else x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            S = S * (seq_idx[:, t] == seq_idx[:, t - 1]).to(S.dtype)[:, None, None, None]
        S = (
            S * torch.exp(dt[:, t] * A)[..., None, None]
            + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        )
        ys.append(torch.einsum("bhpn,bhn->bhp", S, C[:, t]) + D[:, None] * x[:, t])
    return torch.stack(ys, 1), S


def scan_inputs(b=2, l=29, h=4, p=3, g=2, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    return dict(
        x=r(b, l, h, p),
        dt=F.softplus(r(b, l, h)),
        A=-torch.rand(h, generator=gen, dtype=torch.float64) * 2,
        B=r(b, l, g, n),
        C=r(b, l, g, n),
        D=r(h),
    )


@pytest.mark.parametrize("chunk", [4, 8, 64])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("with_init", [False, True])
def test_ssd_scan_matches_recurrence(chunk, packed, with_init):
    a = scan_inputs(seed=chunk)
    b, l, h, p = a["x"].shape
    seq_idx = None
    if packed:  # documents of lengths 5, 11, 13 in row 0; 29 in row 1; boundaries off chunk edges
        seq_idx = torch.tensor([[0] * 5 + [1] * 11 + [2] * 13, [0] * 29])
    init = torch.randn(b, h, p, a["B"].shape[-1], dtype=torch.float64) if with_init else None
    y_ref, s_ref = naive_scan(**a, seq_idx=seq_idx, init=init)
    y, s = ssd_scan_ref(
        a["x"],
        a["dt"],
        a["A"],
        a["B"],
        a["C"],
        chunk,
        D=a["D"],
        seq_idx=seq_idx,
        initial_states=init,
        return_final_states=True,
    )
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-9, atol=1e-9)


def test_ssd_scan_split_with_states_equals_whole():
    a = scan_inputs(seed=3)
    whole, final = ssd_scan_ref(
        **{k: a[k] for k in "x dt A B C".split()}, chunk_size=8, D=a["D"], return_final_states=True
    )
    cut = 11
    first = {k: (v[:, :cut] if v.dim() > 1 else v) for k, v in a.items()}
    rest = {k: (v[:, cut:] if v.dim() > 1 else v) for k, v in a.items()}
    y1, s1 = ssd_scan_ref(
        first["x"], first["dt"], a["A"], first["B"], first["C"], 8, D=a["D"], return_final_states=True
    )
    y2, s2 = ssd_scan_ref(
        rest["x"], rest["dt"], a["A"], rest["B"], rest["C"], 8, D=a["D"], initial_states=s1, return_final_states=True
    )
    torch.testing.assert_close(torch.cat([y1, y2], 1), whole)
    torch.testing.assert_close(s2, final)


def naive_conv(x, w, bias, seq_idx=None):
    b, d, l = x.shape
    k = w.shape[1]
    out = torch.zeros_like(x)
    for t in range(l):
        for j in range(k):
            src = t - (k - 1) + j
            if src < 0 or (seq_idx is not None and (seq_idx[:, src] != seq_idx[:, t]).any()):
                continue
            out[:, :, t] += w[:, j] * x[:, :, src]
    return out + bias[:, None]


def test_conv_with_seq_idx_masks_cross_document_taps():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 12, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(6, generator=gen, dtype=torch.float64)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 2, 3, 3, 3, 3]])
    torch.testing.assert_close(causal_conv1d_ref(x, w, bias, seq_idx=seq_idx), naive_conv(x, w, bias, seq_idx))
    torch.testing.assert_close(causal_conv1d_ref(x, w, bias), naive_conv(x, w, bias))
    # per-document runs equal the packed run
    packed = causal_conv1d_ref(x, w, bias, seq_idx=seq_idx)
    for lo, hi in [(0, 2), (2, 7), (7, 8), (8, 12)]:
        torch.testing.assert_close(packed[..., lo:hi], causal_conv1d_ref(x[..., lo:hi], w, bias))


@pytest.mark.parametrize("l", [2, 12])  # 2: a row shorter than the window
def test_conv_taps_under_compile_equal_aten_conv(monkeypatch, l):
    """Under torch.compile the conv runs as shifted multiply-adds (inductor fuses them): same outputs, final states
    and gradients as ATen's depthwise conv."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, l, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)

    init = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64)

    def run():
        y, state = causal_conv1d_ref(x, w, bias, activation="silu", return_final_states=True)
        y2, state2 = causal_conv1d_ref(x, w, bias, initial_states=init, return_final_states=True)  # continuing
        loss = (y * y.detach().cos()).sum() + (y2 * y2.detach().sin()).sum()
        return (y, state, y2, state2, *torch.autograd.grad(loss, (x, w, bias)))

    aten = run()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for a, b in zip(run(), aten):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aten[0], F.silu(naive_conv(x.detach(), w.detach(), bias.detach())))


def test_conv_update_and_initial_states_continue_the_window():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 9, generator=gen)
    w = torch.randn(5, 4, generator=gen)
    bias = torch.randn(5, generator=gen)
    full = causal_conv1d_ref(x, w, bias, activation="silu")
    head, state = causal_conv1d_ref(x[..., :4], w, bias, activation="silu", return_final_states=True)
    tail = causal_conv1d_ref(x[..., 4:7], w, bias, activation="silu", initial_states=state)
    torch.testing.assert_close(torch.cat([head, tail], -1), full[..., :7])
    _, state = causal_conv1d_ref(x[..., :7], w, bias, return_final_states=True)
    for t in (7, 8):
        torch.testing.assert_close(causal_conv1d_update_ref(x[..., t], state, w, bias, activation="silu"), full[..., t])


def test_state_update_equals_scan_step():
    a = scan_inputs(l=1, seed=5)
    init = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    y_scan, s_scan = ssd_scan_ref(
        a["x"], a["dt"], a["A"], a["B"], a["C"], 4, D=a["D"], initial_states=init, return_final_states=True
    )
    state = init.clone()
    y = selective_state_update_ref(state, a["x"][:, 0], a["dt"][:, 0], a["A"], a["B"][:, 0], a["C"][:, 0], D=a["D"])
    torch.testing.assert_close(y, y_scan[:, 0])
    torch.testing.assert_close(state, s_scan)


def test_gated_rmsnorm_is_groupwise():
    gen = torch.Generator().manual_seed(2)
    x, z = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    w = torch.randn(8, generator=gen)
    y = rmsnorm_gated_ref(x, z, w, 1e-5, group_size=4)
    gated = x * F.silu(z)
    halves = [
        gated[..., i : i + 4] * torch.rsqrt(gated[..., i : i + 4].pow(2).mean(-1, keepdim=True) + 1e-5) for i in (0, 4)
    ]
    torch.testing.assert_close(y, torch.cat(halves, -1) * w)
    assert not torch.allclose(y, rmsnorm_gated_ref(x, z, w, 1e-5, group_size=8))


def test_cpu_dispatch_is_the_reference():
    assert get_ops("cpu") is REFERENCE
    assert not REFERENCE.varlen_for_packing  # CPU masks packed documents densely


def test_compiled_layers_equal_eager_over_varying_lengths():
    """`compile_layers` (what `compile_layers: true` in a recipe runs) under a real torch.compile (dynamo + AOT
    autograd; the conv traced as shifted multiply-adds): a plain row, then a padding-free packed row of another
    length (documents restarting position_ids, as TRL's collator makes them) through the dynamic recompile. Loss
    and every gradient equal eager's (ATen's conv, the dense document mask) for both."""
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(1, 97, (1, 40), generator=gen), None)]
    lengths = (9, 14, 10)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    batches.append((torch.randint(1, 97, (1, sum(lengths)), generator=gen), pos))

    def run(model):
        out = []
        for ids, pos in batches:
            model.zero_grad()
            loss = model(ids, position_ids=pos, labels=ids).loss
            loss.backward()
            out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        return out

    eager = run(tiny_model(seed=6).train())
    torch._dynamo.utils.counters.clear()
    compiled = run(tiny_model(seed=6).train().compile_layers(backend="aot_eager"))  # training: no cache, compiled
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] > 50  # the layers really ran compiled
    for (loss_c, grads_c), (loss_e, grads_e) in zip(compiled, eager):
        assert rel_err(loss_c, loss_e) < 1e-6
        for name, grad in grads_e.items():
            assert rel_err(grads_c[name], grad) < 1e-5, name


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused-projections"])
def test_compiled_layers_take_new_lengths_without_graph_breaks(monkeypatch, fused):
    """Plain rows of three lengths (SFT without packing): one static compile, one with a symbolic length, then
    none — and no graph break (SDPA's is_causal once read a comparison of symbolic lengths and broke every layer),
    also with the CUDA default of fused projections (their eligibility checks run at trace time)."""
    if fused:
        monkeypatch.setattr(modeling, "get_ops", lambda device: replace(REFERENCE, fast=True))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model(seed=7).train().compile_layers(backend="aot_eager")
    for length in (40, 48, 56):  # forwards only (the breaks are the forward's; AOT's backward trace is slow on CPU)
        ids = torch.randint(1, 97, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            model(ids, labels=ids)
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_compiled_layers_take_inductor_options_unless_a_mode_is_given(monkeypatch):
    """compile_layers hands inductor its concat (not pointwise) cat; a caller's mode or options are kept; without a
    backend, inductor on CUDA and aot_eager on CPU."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or object())  # one token per compile
    monkeypatch.setattr(acceleration, "_COMPILED_BLOCKS", {})
    block = modeling.FalconH1DecoderLayer.block
    compiled = lambda settings, device: acceleration.compiled_block(block, settings, device)
    for options in ({}, {"options": {"max_pointwise_cat_inputs": 4}}, {"mode": "max-autotune"}):
        compiled(("inductor", None, options), "cuda")
    aot_eager = compiled(("aot_eager", None, {}), "cuda")
    # the default: inductor on CUDA, aot_eager elsewhere (the same compiled functions as named ones)
    assert compiled((None, None, {}), "cuda") is compiled(("inductor", None, {}), "x")
    assert compiled((None, None, {}), "cpu") is aot_eager
    keys = {"max_pointwise_cat_inputs", "max_complex_pointwise_cat_inputs"}
    options = acceleration.inductor_options()
    assert "max_pointwise_cat_inputs" in options and set(options) <= keys
    assert set(options.values()) == {0}
    assert calls[0]["options"] == options
    assert calls[1]["options"]["max_pointwise_cat_inputs"] == 4
    assert "options" not in calls[2] and calls[2]["mode"] == "max-autotune"
    assert "options" not in calls[3] and len(calls) == 4


def test_mixer_streams_only_where_they_are_safe_and_pay(monkeypatch):
    """The side stream for attention (model.settings.mixer_streams): by default only in training graphs, switched by
    the setting, off under torch.distributed (gradient hooks), and per layer never with a cache, context parallelism,
    a checkpointed training layer or a CPU tensor."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from model import kernels
    from model.modeling import LayerInputs
    from model.settings import overridden

    assert kernels.mixer_streams_wanted(in_graphs=True) and not kernels.mixer_streams_wanted(in_graphs=False)
    for setting in (False, True):
        with overridden(mixer_streams=setting):
            assert kernels.mixer_streams_wanted(in_graphs=True) == kernels.mixer_streams_wanted(False) == setting
    layer = tiny_model().model.layers[0].train()
    on_cuda = SimpleNamespace(is_cuda=True)
    streams = LayerInputs(None, None, REFERENCE, streams=True)
    assert layer._two_streams(streams, on_cuda)
    assert not layer._two_streams(replace(streams, streams=False), on_cuda)
    assert not layer._two_streams(replace(streams, cache=object()), on_cuda)
    assert not layer._two_streams(replace(streams, cp=object()), on_cuda)
    assert not layer._two_streams(streams, torch.zeros(1))
    layer.gradient_checkpointing = True
    assert not layer._two_streams(streams, on_cuda)
    assert layer.eval()._two_streams(streams, on_cuda)  # no recompute without training

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    assert not kernels.mixer_streams_wanted(in_graphs=True)
    with overridden(mixer_streams=True):
        assert not kernels.mixer_streams_wanted(in_graphs=False)
