"""GPU fast path against the reference path (marker `gpu`; skipped without CUDA).

Tolerances (relative error ‖fast − ref‖∞ / ‖ref‖∞): fp32 ≤ 5e-3 (Triton runs fp32 dots in tf32), bf16 ≤ 3e-2 for
single ops. Whole models in bf16 are held to the reference's own bf16 accuracy against fp32 (`assert_as_accurate`):
two bf16 runs of a model differ by as much as either differs from fp32.

Every test first checks that the ops it tests are the fast ones (`fast_ops`): it is skipped where the package
supplying them is not installed, and it fails where an installed package's op fell back to the reference, so no test
passes by comparing the reference with itself.
"""

import contextlib
import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from model.kernels import REFERENCE, Ops, get_ops
from model.settings import overridden
from tests.conftest import assert_as_accurate, rel_err, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def configured():
    """model.settings changed for one test (`configured(mixer_streams=True)`), restored after it."""
    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(overridden(**changes))


# the module supplying each fast op under the default provider, kernels="auto" (model/kernels/cuda.py); the conv is
# the reference there (inductor fuses it under compile), causal-conv1d serves kernels="mamba-ssm" only
SUPPLIERS = {
    "ssd_scan": "triton",  # ours (model/kernels/ssd.py), or mamba-ssm's where installed
    "selective_state_update": "triton",
    "rmsnorm_gated": "triton",
    "varlen_attention": "torch.nn.attention.varlen",
}
# our Triton kernels against the fp64 reference (tests/model/triton_checks.py): fp32 arithmetic inside; bf16 outputs
# rounded to nearest, half a bf16 step (3.9e-3) at most
TRITON_TOL = {torch.float32: 2e-5, torch.bfloat16: 5e-3}


def fast_ops(*needed: str) -> Ops:
    """The ops chosen for CUDA. Fails if any op whose module is installed is still the reference (a silent
    fallback); skips if a `needed` op's module is not installed (the test would compare the reference with itself)."""
    ops = get_ops("cuda")
    installed = {name: importlib.util.find_spec(module) is not None for name, module in SUPPLIERS.items()}
    fell_back = [name for name in SUPPLIERS if installed[name] and getattr(ops, name) is getattr(REFERENCE, name)]
    assert not fell_back, f"{fell_back} run the reference although their modules are installed (ops: {ops.name})"
    missing = sorted({SUPPLIERS[name] for name in needed if not installed[name]})
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: no fast {', '.join(needed)} to test")
    return ops


def our_scan(configured) -> Ops:
    """The tests of the training machinery (graphs, compiled layers, streams) run our Triton scan whatever else is
    installed. mamba-ssm autotunes its ~200 kernel configurations on first use, per chunk, head and state size and
    dtype, in each process (TRL's DPO step over mamba-ssm took 71 s for its first step on an H100), and none of these
    tests finished within a GPU-test budget with it. The scan's providers are held to each other and to the
    reference by the tests above."""
    configured(kernels="triton")
    return fast_ops("ssd_scan")


def _loss_and_grads(model, ids, **kw):
    """One training forward and backward → (loss, {name: gradient}), both fp32."""
    model.zero_grad()
    loss = model(ids, labels=ids, **kw).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def _scan_args(dtype, b=2, l=300, h=8, p=32, g=2, n=16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, dt=dtype: torch.randn(*s, generator=gen, device="cuda", dtype=dt)
    return dict(
        x=r(b, l, h, p),
        dt=F.softplus(r(b, l, h, dt=torch.float32)) * 0.5,
        A=-torch.rand(h, generator=gen, device="cuda") * 2 - 0.1,
        B=r(b, l, g, n),
        C=r(b, l, g, n),
        D=r(h, dt=torch.float32),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True])
def test_ssd_scan_fast_matches_reference(dtype, packed):
    fast = fast_ops("ssd_scan")
    a = _scan_args(dtype)
    seq_idx = None
    if packed:
        seq_idx = torch.zeros(2, 300, dtype=torch.int32, device="cuda")
        seq_idx[0, 70:] = 1
        seq_idx[0, 201:] = 2
        seq_idx[1, 129:] = 1
    # packed rows with an initial state: what context parallelism feeds a rank (it belongs to document 0)
    init = torch.randn(2, 8, 32, 16, device="cuda")
    y_ref, s_ref = REFERENCE.ssd_scan(
        **a, chunk_size=64, seq_idx=seq_idx, initial_states=init, return_final_states=True
    )
    y, s = fast.ssd_scan(**a, chunk_size=64, seq_idx=seq_idx, initial_states=init, return_final_states=True)
    assert rel_err(y.float(), y_ref.float()) < TOL[dtype]
    assert rel_err(s, s_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True])
def test_ssd_scan_backward_matches_reference(dtype, packed):
    """Gradients of every input, the initial state included, through y and the final state (the custom op's own
    backward from the forward's saved chunk states); packed: documents restarting inside and across chunks."""
    fast = fast_ops("ssd_scan")
    a = {k: v.requires_grad_() for k, v in _scan_args(dtype, l=200).items()}
    kw = {}
    if packed:
        seq_idx = torch.zeros(2, 200, dtype=torch.int32, device="cuda")
        seq_idx[0, 70:] = 1
        seq_idx[0, 128:] = 2
        seq_idx[1, 150:] = 1
        init = torch.randn(2, 8, 32, 16, device="cuda", requires_grad=True)
        kw, a["initial_states"] = dict(seq_idx=seq_idx), init
    grads = []
    for ops in (REFERENCE, fast):
        y, final = ops.ssd_scan(**a, **kw, chunk_size=64, return_final_states=True)
        loss = (
            y.float().square().sum()
            + (final * torch.linspace(-1, 1, final.numel(), device="cuda").view_as(final)).sum()
        )
        grads.append(torch.autograd.grad(loss, list(a.values())))
    for name, g_ref, g in zip(a, *grads):
        assert rel_err(g.float(), g_ref.float()) < 3 * TOL[dtype], name


def _over(errors: dict, tol: float) -> dict:
    return {case: err for case, err in errors.items() if not err < tol}  # `not <`: a NaN is over too


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_state_update_matches_reference(dtype):
    """Our decode step (model/kernels/state_update.py) at the released head and state sizes, 1 and 2 groups, strided
    x, B, C, with and without D, z, dt bias + softplus and a dt limit: y and the state, against fp64."""
    from tests.model.triton_checks import state_update_errors

    fast = fast_ops("selective_state_update")
    assert not _over(state_update_errors(fast.selective_state_update, "cuda", dtype), TRITON_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_gated_norm_matches_reference(dtype):
    """Our gated RMSNorm (model/kernels/gated_norm.py) at the released widths and groups (1536 … 4096 channels),
    gate before and after the norm, with and without z: y and the gradients of x, z and weight, against fp64."""
    from tests.model.triton_checks import rmsnorm_gated_errors

    fast = fast_ops("rmsnorm_gated")
    assert not _over(rmsnorm_gated_errors(fast.rmsnorm_gated, "cuda", dtype), TRITON_TOL[dtype])


def test_triton_ops_compile_and_pass_opcheck():
    """Both custom ops under inductor (fullgraph) give eager's numbers; torch.library.opcheck passes on the card."""
    from tests.model.triton_checks import compiled_errors, opcheck_failures

    fast_ops("selective_state_update", "rmsnorm_gated")
    assert not _over(compiled_errors("cuda"), 1e-6)
    assert opcheck_failures("cuda") == []


@pytest.mark.parametrize("op", ["selective_state_update", "rmsnorm_gated"])
def test_triton_ops_at_least_as_accurate_as_mamba_ssm(op):
    """bf16, case by case against the fp64 reference: ours is no less accurate than mamba-ssm's kernel (10% and 1e-6
    of slack for ties in rounding), for y, the state, and every gradient."""
    from tests.model.triton_checks import rmsnorm_gated_errors, state_update_errors

    ours = getattr(fast_ops(op), op)
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba-ssm not installed: nothing to compare with")
    with overridden(kernels="mamba-ssm"):
        theirs = getattr(get_ops("cuda"), op)
    check = state_update_errors if op == "selective_state_update" else rmsnorm_gated_errors
    mine, other = check(ours, "cuda", torch.bfloat16), check(theirs, "cuda", torch.bfloat16)
    worse = {case: (mine[case], other[case]) for case in mine if not mine[case] <= 1.1 * other[case] + 1e-6}
    assert not worse


def test_auto_runs_without_mamba_ssm_or_causal_conv1d(monkeypatch, configured):
    """What a plain `pip install` gets: mamba-ssm and causal-conv1d hidden, kernels="auto" runs our Triton kernels
    (the SSD scan ours too). A training step's loss and every gradient, and greedy `generate`
    (our state update inside the compiled decode step's CUDA graph), equal the reference path's in fp32."""
    import sys

    from model.kernels import cuda

    monkeypatch.setattr(cuda, "import_mamba_triton", lambda: None)
    monkeypatch.setitem(sys.modules, "causal_conv1d", None)
    configured(kernels="auto")  # forgets the choice made before the packages were hidden
    name = get_ops("cuda").name
    assert "selective_state_update:triton" in name and "rmsnorm_gated:triton" in name and "mamba" not in name
    assert "ssd_scan:triton" in name
    model = tiny_model(seed=1, mamba_n_groups=2, mamba_chunk_size=16, time_step_limit=(0.01, 0.5)).to("cuda")
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, 97, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    kw = dict(max_new_tokens=16, do_sample=False)
    loss, grads = _loss_and_grads(model, ids)
    tokens = model.eval().set_decode(static_cache=None, graphs=True, compile=True).generate(ids[:, :12], **kw)
    configured(kernels="reference")
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    ref_tokens = model.eval().set_decode(static_cache=False).generate(ids[:, :12], **kw)
    assert rel_err(loss, ref_loss) < TOL[torch.float32]
    for n in ref_grads:
        assert rel_err(grads[n], ref_grads[n]) < 5 * TOL[torch.float32], n
    assert tokens.tolist() == ref_tokens.tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_varlen_attention_matches_reference(dtype):
    fast = fast_ops("varlen_attention")
    q = torch.randn(300, 8, 64, device="cuda", dtype=dtype)
    k, v = torch.randn(300, 2, 64, device="cuda", dtype=dtype), torch.randn(300, 2, 64, device="cuda", dtype=dtype)
    cu = torch.tensor([0, 17, 150, 151, 300], device="cuda", dtype=torch.int32)
    ref = REFERENCE.varlen_attention(q, k, v, cu, 149, 0.125)
    assert rel_err(fast.varlen_attention(q, k, v, cu, 149, 0.125).float(), ref.float()) < TOL[dtype]


def _both_paths(fn):
    """fn() on the reference path, then on the fast path → (reference result, fast result)."""
    out = {}
    for mode in ("reference", "auto"):
        with overridden(kernels=mode):
            if mode == "auto":
                fast_ops("ssd_scan")
            out[mode] = fn()
    return out["reference"], out["auto"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_whole_model_fast_path_matches_reference_path(monkeypatch, dtype):
    """Fast path (Triton scan, fused projections, the CUDA attention) against the reference path: fp32 within the
    stated tolerances; bf16 within twice the reference's bf16 error on the logits and on every gradient, both against
    the reference path in fp32 on the same (bf16-rounded) weights."""
    model = tiny_model(seed=1, mamba_n_groups=2, mamba_chunk_size=16, mamba_d_state=16).to("cuda", dtype)
    ids = torch.randint(0, 97, (2, 100), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def run(m):
        m.zero_grad()
        out = m(ids, labels=ids, return_logits=True)
        out.loss.backward()
        return out.logits.float(), {n: p.grad.float().clone() for n, p in m.named_parameters()}

    (l_ref, g_ref), (l_fast, g_fast) = _both_paths(lambda: run(model))
    if dtype == torch.float32:
        assert rel_err(l_fast, l_ref) < TOL[dtype]
        for name in g_ref:
            assert rel_err(g_fast[name], g_ref[name]) < 5 * TOL[dtype], name
    else:
        with overridden(kernels="reference"):
            truth = run(copy.deepcopy(model).float())  # the reference path in fp32
        assert_as_accurate((l_fast, g_fast), (l_ref, g_ref), truth)


def test_segmented_scan_on_gpu(monkeypatch):
    """The long-row scan segments through the Triton kernels (initial and final states, their gradients). Chunk 16
    as in the other GPU tests: mamba-ssm autotunes each kernel per chunk size, minutes for a new one."""
    from tests.model.scan_segments import check_segmented_scan

    fast_ops("ssd_scan")
    check_segmented_scan("cuda", monkeypatch, TOL[torch.float32], chunk=16)


def test_packed_isolation_and_cache_on_gpu():
    fast_ops("ssd_scan", "selective_state_update")
    model = tiny_model(seed=2, mamba_chunk_size=16).to("cuda")
    gen = torch.Generator("cuda").manual_seed(1)
    docs = [torch.randint(1, 97, (n,), device="cuda", generator=gen) for n in (37, 5, 58)]
    pos = torch.cat([torch.arange(len(d), device="cuda") for d in docs])[None]
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], position_ids=pos).logits[0]
        start = 0
        for d in docs:
            assert rel_err(packed[start : start + len(d)], model(d[None]).logits[0]) < TOL[torch.float32]
            start += len(d)
        ids = torch.cat(docs)[None, :40]
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :20], use_cache=True)
        cache = out.past_key_values
        out = model(ids[:, 20:33], past_key_values=cache)  # chunked prefill on a non-empty cache
        assert rel_err(out.logits, full[:, 20:33]) < TOL[torch.float32]
        for t in range(33, 40):
            step = model(ids[:, t : t + 1], past_key_values=cache).logits[:, -1]
            assert rel_err(step, full[:, t]) < TOL[torch.float32], t


@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_free_padded_batch_on_gpu(dtype):
    """set_padding_free on CUDA (varlen attention, seq_idx in the Triton scan) equals the padded computation."""
    fast_ops("ssd_scan", "varlen_attention")
    model = tiny_model(seed=3, mamba_chunk_size=16).to("cuda", dtype)
    gen = torch.Generator("cuda").manual_seed(2)
    lengths = (37, 5, 58, 21)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n], mask[i, :n] = torch.randint(1, 97, (n,), device="cuda", generator=gen), 1
    labels = ids.masked_fill(mask == 0, -100)
    out = {}
    for padding_free in (False, True):
        model.set_padding_free(padding_free).zero_grad()
        res = model(ids, attention_mask=mask, labels=labels, return_logits=True)
        res.loss.backward()
        out[padding_free] = (
            res.logits.float()[mask.bool()],
            {n: q.grad.float().clone() for n, q in model.named_parameters()},
        )
    assert rel_err(out[True][0], out[False][0]) < TOL[dtype]
    for name in out[False][1]:
        assert rel_err(out[True][1][name], out[False][1][name]) < 5 * TOL[dtype], name


@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled-graph"])
@pytest.mark.parametrize("batch", [1, 3])
def test_generate_replays_a_cuda_graph_and_equals_eager_generate(batch, compile):
    """`generate`'s default CUDA path (static cache, the forward captured in a graph) gives the eager path's greedy
    tokens in fp32, with a left-padded row and a time-step limit, and replays the graph for every token after the
    first; a second call reuses the captured graph."""
    model = tiny_model(seed=3, mamba_chunk_size=16, time_step_limit=(0.01, 0.5)).to("cuda").eval()
    fast_ops("ssd_scan", "selective_state_update")
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, 97, (batch, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[0, :4], mask[0, :4] = 0, 0  # one left-padded row
    kw = dict(attention_mask=mask, max_new_tokens=20, do_sample=False)
    eager = model.set_decode(static_cache=False).generate(ids, **kw)
    model.set_decode(static_cache=None, graphs=True, compile=compile)
    assert model.generate(ids, **kw).tolist() == eager.tolist()
    (cache,) = model._static_caches._caches.values()
    graph = cache.decoder.graph
    assert graph is not None and cache.seen_tokens == 12 + 19  # 19 steps replayed after the prefill
    assert model.generate(ids, **kw).tolist() == eager.tolist()
    assert cache.decoder.graph is graph  # reused, not captured again


@pytest.mark.parametrize("compile", [False, True], ids=["graphs", "compiled-graphs"])  # compiled: the conv as taps
@pytest.mark.parametrize("packed", [False, True])
def test_training_graphs_match_eager(configured, packed, compile):
    """Every layer captured against the same ops run eagerly (unfused projections, attention on a side stream, as
    the graphs run them), for two different batches (inputs really flow into the static buffers): bf16 loss and every
    gradient as accurate as eager's against fp32 on the same weights. Two bf16 paths compared directly differ by
    rounding alone: against the default eager step (fused projections, one stream) the unpacked graphs differ by 3.9%
    of the largest embedding gradient entry (H200), and in fp32 by 7.8e-5."""
    from model.graphs import disable_training_graphs, enable_training_graphs

    our_scan(configured)
    configured(fused_projections=False, mixer_streams=True)
    model = tiny_model(seed=4, mamba_chunk_size=16).to("cuda", torch.bfloat16).train()
    truth_model = copy.deepcopy(model).float()
    gen = torch.Generator("cuda").manual_seed(3)
    if packed:  # TRL's padding-free rows: one row, 3 documents; the first shorter than the budget (a filler is added)
        docs = [(100, 3, 127), (60, 120, 76)]
        batches = [torch.randint(1, 97, (1, sum(d)), device="cuda", generator=gen) for d in docs]
        kws = [{"position_ids": torch.cat([torch.arange(n, device="cuda") for n in d])[None]} for d in docs]
        shape = dict(batch=1, seqlen=256, max_docs=4)
    else:
        batches = [torch.randint(1, 97, (2, 128), device="cuda", generator=gen) for _ in range(2)]
        kws, shape = [{}, {}], dict(batch=2, seqlen=128, max_docs=None)

    eager = [_loss_and_grads(model, ids, **kw) for ids, kw in zip(batches, kws)]
    truth = [_loss_and_grads(truth_model, ids, **kw) for ids, kw in zip(batches, kws)]
    graphs = enable_training_graphs(model, **shape, compile=compile, mixer_streams=True)
    assert graphs.settings["mixer_streams"]  # what the default runs
    graphed = [_loss_and_grads(model, ids, **kw) for ids, kw in zip(batches, kws)]
    disable_training_graphs(model)
    assert graphs.replayed == len(batches) and not graphs.eager, f"the captured graphs did not run: {graphs.eager}"
    for got, base, fp32 in zip(graphed, eager, truth):
        assert_as_accurate(got, base, fp32)


def test_training_graphs_accumulate_gradients_over_a_ladder(configured):
    """Gradient accumulation through captured layers at two token budgets (the Trainer's micro-batches, no zero_grad
    between them): the replayed backward hands gradients over as views of static buffers, which autograd would adopt
    as `.grad` and the next replay overwrite. Three packed rows (two on the small budget, one on the large) summed:
    loss and every gradient as accurate as eager's against fp32."""
    from model.graphs import disable_training_graphs, enable_training_graphs

    our_scan(configured)
    configured(fused_projections=False, mixer_streams=True)
    model = tiny_model(seed=4, mamba_chunk_size=16).to("cuda", torch.bfloat16).train()
    truth_model = copy.deepcopy(model).float()
    gen = torch.Generator("cuda").manual_seed(3)
    docs = [(60, 3, 57), (100, 120, 30), (40, 70)]  # 120 and 110 tokens on the 128 budget, 250 on the 256
    rows = [torch.randint(1, 97, (1, sum(d)), device="cuda", generator=gen) for d in docs]
    kws = [{"position_ids": torch.cat([torch.arange(n, device="cuda") for n in d])[None]} for d in docs]

    def accumulated(m):
        m.zero_grad()  # set_to_none, as the Trainer does after each optimizer step
        losses = []
        for ids, kw in zip(rows, kws):
            loss = m(ids, labels=ids, **kw).loss
            loss.backward()
            losses.append(loss.detach().float())
        return torch.stack(losses), {n: p.grad.float().clone() for n, p in m.named_parameters()}

    eager, truth = accumulated(model), accumulated(truth_model)
    graphs = enable_training_graphs(model, 1, 256, max_docs=6, budgets=[128], max_doc_len=128, mixer_streams=True)
    graphed = accumulated(model)
    disable_training_graphs(model)
    assert graphs.replayed_at == {128: 2, 256: 1} and not graphs.eager
    assert_as_accurate(graphed, eager, truth)


@pytest.mark.parametrize("packed", [False, True])
def test_compile_layers_match_eager_on_gpu(configured, packed):
    """`compile_layers` (inductor) on the fast ops: the scan as one custom op, the conv as taps, the gated norm
    traced; two lengths (the second through the dynamic recompile). bf16 loss and every gradient within twice
    eager's bf16 error, both against eager fp32 on the same weights (inductor rounds less often than eager)."""
    our_scan(configured)
    eager_model = tiny_model(seed=4, mamba_chunk_size=16).to("cuda", torch.bfloat16).train()
    truth_model = copy.deepcopy(eager_model).float()
    compiled_model = copy.deepcopy(eager_model).compile_layers()
    gen = torch.Generator("cuda").manual_seed(3)
    for length in (128, 100):
        ids = torch.randint(1, 97, (1, length), device="cuda", generator=gen)
        kw = {}
        if packed:
            kw["position_ids"] = torch.cat([torch.arange(n, device="cuda") for n in (40, 3, length - 43)])[None]
        assert_as_accurate(*(_loss_and_grads(model, ids, **kw) for model in (compiled_model, eager_model, truth_model)))


@pytest.mark.parametrize(
    "mode, dtype, packed",
    [
        ("eager", torch.float32, False),
        ("compiled", torch.float32, True),
        ("graphs", torch.float32, False),
        ("graphs", torch.bfloat16, True),
    ],
)
def test_mixer_streams_match_one_stream(monkeypatch, configured, mode, dtype, packed):
    """Attention on a side stream beside the SSM branch (settings' mixer_streams), forward and backward: eagerly,
    through `compile_layers` (each branch its own graph) and captured in compiled training graphs, the loss and every
    gradient equal one stream's, and the side stream really ran. fp32: same kernels either way, only the split of the
    compiled layer into per-branch graphs (and mamba-ssm's atomic adds, where it ran the scan) moves roundings: H200,
    1.4e-4 of the largest `dt_bias` gradient entry (graphs against eager on one stream: 7.8e-5, from the unfused
    projections), hence 1e-3; a stream race is off by O(1). bf16: that split rounds at the graph boundaries (H200:
    2.7% of the largest embedding gradient entry between the two), so the two-stream run is held to one stream's
    accuracy against fp32 (`assert_as_accurate`)."""
    import model.modeling as modeling
    from model.graphs import disable_training_graphs, enable_training_graphs

    our_scan(configured)
    calls = []
    two_streams = modeling.on_two_streams
    monkeypatch.setattr(modeling, "on_two_streams", lambda *args: calls.append(1) or two_streams(*args))
    model = tiny_model(seed=5, mamba_chunk_size=16).to("cuda", dtype).train()
    truth_model = copy.deepcopy(model).float()
    if mode == "compiled":
        model.compile_layers()
    gen = torch.Generator("cuda").manual_seed(4)
    ids = torch.randint(1, 97, (1, 128), device="cuda", generator=gen)
    kw = {"position_ids": torch.cat([torch.arange(n, device="cuda") for n in (50, 3, 75)])[None]} if packed else {}

    def loss_and_grads(model, streams, graphs):
        configured(mixer_streams=streams)
        captured = None
        if graphs:
            docs = 4 if packed else None
            captured = enable_training_graphs(model, 1, 128, max_docs=docs, compile=True, mixer_streams=streams)
        out = _loss_and_grads(model, ids, **kw)
        disable_training_graphs(model)
        assert (captured.replayed if captured else 0) == int(graphs), "the captured graphs did not run"
        return out

    graphs = mode == "graphs"
    one, two = loss_and_grads(model, False, graphs), loss_and_grads(model, True, graphs)
    assert calls, "the two-stream path never ran"
    if dtype == torch.bfloat16:
        assert_as_accurate(two, one, loss_and_grads(truth_model, False, graphs=False))
        return
    (l_one, g_one), (l_two, g_two) = one, two
    assert rel_err(l_two, l_one) < 1e-4
    for name in g_one:
        assert rel_err(g_two[name], g_one[name]) < 1e-3, name
