"""The SSD kernels' checks (model/kernels/ssd.py), shared by tests/model/test_ssd_kernels.py: on a GPU in the test's
own process, on CPU in a subprocess under Triton's interpreter (it must be switched on before the kernels are
defined):

    TRITON_INTERPRET=1 python -m tests.model.ssd_cases plain packed_many_docs   # → one JSON line of errors

Each case draws inputs, runs our scan and the reference (`ref.ssd_scan_ref` in fp64, the truth) forward and
backward through one loss that reaches y and the final state, and reports relative errors ‖ours − truth‖∞ / ‖truth‖∞
for y, the final state and the gradient of every input. Cases in a low precision also report the reference's own
error on the same low-precision inputs (`ref`), the bar ours is held to.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

import torch

# name → inputs: b, l, H, P, G, N, chunk; dtype; packed documents (a list of lengths to cycle, or None); an
# initial state; D; a gradient on the final state; raw dt discretised in the kernel (bias, softplus, limit);
# block caps (model.kernels.ssd.CAPS) lowered so that every tiling loop runs more than once; "group_programs" 1: the dB
# and dC kernels sum all of a group's heads in one program, 6: two parts of two heads each (3 programs a kernel here;
# short rows split a group's heads over programs, ssd.GROUP_PROGRAMS)
CASES = {
    "plain": dict(b=2, l=100, H=4, P=16, G=2, N=16, chunk=32),
    "one_group_init": dict(b=1, l=90, H=4, P=16, G=1, N=16, chunk=32, init=True, caps=dict(group_programs=6)),
    "packed_many_docs": dict(b=2, l=150, H=2, P=16, G=1, N=16, chunk=16, docs=[1, 3, 7, 2, 16, 1, 12, 5], init=True),
    "ragged_tiles": dict(
        b=1,
        l=150,
        H=4,
        P=32,
        G=2,
        N=32,
        chunk=64,
        docs=[40, 9, 70],
        init=True,
        caps=dict(rows=16, cols=16, n=16, p=16, group_programs=1),
    ),
    "odd_chunk_no_D": dict(b=2, l=61, H=2, P=8, G=1, N=8, chunk=24, D=False, dfinal=False),
    "dt_fused": dict(b=2, l=70, H=4, P=16, G=2, N=16, chunk=16, docs=[9, 30, 4], init=True, fused=True),
    "bf16": dict(b=2, l=100, H=4, P=16, G=2, N=16, chunk=32, docs=[30, 21, 60], init=True, dtype="bfloat16"),
}
# what the GPU tests add: the released head sizes (P 64, N 128, chunk 128) over several chunks
GPU_CASES = {
    "released_fp32": dict(b=2, l=1000, H=8, P=64, G=1, N=128, chunk=128, docs=[300, 17, 500], init=True),
    "released_bf16": dict(
        b=2, l=1000, H=8, P=64, G=1, N=128, chunk=128, docs=[300, 17, 500], init=True, dtype="bfloat16"
    ),  # fmt: skip
    "released_two_groups_bf16": dict(b=1, l=2100, H=8, P=64, G=2, N=128, chunk=128, dtype="bfloat16", fused=True),
}


def _doc_ids(b: int, l: int, lengths: list[int]) -> torch.Tensor:
    """(b, l) int32 document index, documents of `lengths` in turn (row i starts i entries later)."""
    rows = []
    for i in range(b):
        ids, doc, k = [], 0, i
        while len(ids) < l:
            ids += [doc] * lengths[k % len(lengths)]
            doc, k = doc + 1, k + 1
        rows.append(ids[:l])
    return torch.tensor(rows, dtype=torch.int32)


def inputs(spec: dict, device: str = "cpu", seed: int = 0) -> dict:
    """The scan's inputs in the case's dtype (dt, A, D, the bias and the initial state fp32, as the model has them)."""
    gen = torch.Generator().manual_seed(seed)
    b, l, H, P, G, N = (spec[k] for k in ("b", "l", "H", "P", "G", "N"))
    dtype = getattr(torch, spec.get("dtype", "float32"))
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    a = dict(x=r(b, l, H, P).to(dtype), A=-torch.rand(H, generator=gen) * 2 - 0.1, B=r(b, l, G, N).to(dtype),
             C=r(b, l, G, N).to(dtype))  # fmt: skip
    if spec.get("fused"):  # raw dt around the limit's ends: some steps clamp below, some above
        a["dt"], a["dt_bias"] = r(b, l, H) * 2, r(H) * 0.5
    else:
        a["dt"] = torch.nn.functional.softplus(r(b, l, H)) * 0.5
    if spec.get("D", True):
        a["D"] = r(H)
    if spec.get("init"):
        a["initial_states"] = r(b, H, P, N)
    out = {k: v.to(device) for k, v in a.items()}
    if spec.get("docs"):
        out["seq_idx"] = _doc_ids(b, l, spec["docs"]).to(device)
    return out


def _options(spec: dict) -> dict:
    fused = dict(dt_softplus=True, dt_limit=(0.05, 0.9)) if spec.get("fused") else {}
    return dict(chunk_size=spec["chunk"], return_final_states=True, **fused)


def _outputs_and_grads(scan, a: dict, spec: dict, probes: dict) -> dict:
    """y, the final state and every input's gradient of Σ probe_y·y + Σ probe_final·final (fp64 probes)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in a.items() if k != "seq_idx"}
    y, final = scan(**leaves, seq_idx=a.get("seq_idx"), **_options(spec))
    loss = (y.double() * probes["y"]).sum()
    if spec.get("dfinal", True):
        loss = loss + (final.double() * probes["final"]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(y=y.detach(), final=final.detach(), **{"d" + k: g for k, g in zip(leaves, grads)})


def _rel_errors(got: dict, truth: dict) -> dict:
    return {k: ((got[k].double() - v).abs().max() / v.abs().max().clamp(min=1e-30)).item() for k, v in truth.items()}


@contextmanager
def _caps(caps: dict | None):
    """ssd.CAPS lowered as the case asks, and ssd.GROUP_PROGRAMS (its "group_programs")."""
    from model.kernels import ssd

    caps = dict(caps or {})
    saved, saved_programs = dict(ssd.CAPS), ssd.GROUP_PROGRAMS
    ssd.GROUP_PROGRAMS = caps.pop("group_programs", ssd.GROUP_PROGRAMS)
    ssd.CAPS.update(caps)
    try:
        yield
    finally:
        ssd.CAPS.clear()
        ssd.CAPS.update(saved)
        ssd.GROUP_PROGRAMS = saved_programs


def errors(name: str, device: str = "cpu", scans: dict | None = None) -> dict:
    """{"ours": {quantity: relative error}, "ref": ... (low precision only), and one entry per extra scan in `scans`}
    against the reference in fp64."""
    from model.kernels import ssd
    from model.kernels.ref import ssd_scan_ref

    spec = {**CASES, **GPU_CASES}[name]
    a = inputs(spec, device)
    gen = torch.Generator().manual_seed(1)
    b, l, H, P, N = (spec[k] for k in ("b", "l", "H", "P", "N"))
    probes = dict(y=torch.randn(b, l, H, P, generator=gen, dtype=torch.float64).to(device),
                  final=torch.randn(b, H, P, N, generator=gen, dtype=torch.float64).to(device))  # fmt: skip
    as64 = {k: (v.double() if v.is_floating_point() else v) for k, v in a.items()}
    truth = _outputs_and_grads(ssd_scan_ref, as64, spec, probes)
    with _caps(spec.get("caps")):
        out = dict(ours=_rel_errors(_outputs_and_grads(ssd.ssd_scan, a, spec, probes), truth))
    if spec.get("dtype", "float32") != "float32":
        out["ref"] = _rel_errors(_outputs_and_grads(ssd_scan_ref, a, spec, probes), truth)
    for label, scan in (scans or {}).items():
        out[label] = _rel_errors(_outputs_and_grads(scan, a, spec, probes), truth)
    return out


def recompute_difference(name: str, device: str = "cpu") -> float:
    """Largest difference between the backward from the forward's kept states and one that recomputes them."""
    from model.kernels import ssd

    spec = CASES[name]
    a = inputs(spec, device)
    opts = _options(spec)
    kw = dict(D=a.get("D"), dt_bias=a.get("dt_bias"), initial_states=a.get("initial_states"),
              seq_idx=a.get("seq_idx"), dt_softplus=opts.get("dt_softplus", False),
              dt_limit=opts.get("dt_limit", ssd.NO_LIMIT))  # fmt: skip
    args = (a["x"], a["dt"], a["A"], a["B"], a["C"], spec["chunk"])
    y, final, dt_c, cum, states = ssd.ssd_forward(*args, **kw)
    dy, dfinal = torch.ones_like(y), torch.ones_like(final)
    kept = ssd.ssd_backward(dy, dfinal, *args, **kw, dt_c=dt_c, cum=cum, states=states)
    again = ssd.ssd_backward(dy, dfinal, *args, **kw)
    return max((k.double() - r.double()).abs().max().item() for k, r in zip(kept, again) if k is not None)


def strided_difference(name: str, device: str = "cpu") -> float:
    """Largest difference, forward and backward, between x, B, C read as views of one (b, l, H·P + 2·G·N) tensor (the
    conv output's layout) and the same values contiguous."""
    from model.kernels import ssd

    spec = CASES[name]
    a = inputs(spec, device)
    b, l = a["x"].shape[:2]
    packed = torch.cat([a["x"].flatten(2), a["B"].flatten(2), a["C"].flatten(2)], dim=-1)
    x, B, C = packed.split([a["x"][0, 0].numel(), a["B"][0, 0].numel(), a["C"][0, 0].numel()], dim=-1)
    views = dict(a, x=x.view(a["x"].shape), B=B.view(a["B"].shape), C=C.view(a["C"].shape))
    assert not views["x"].is_contiguous()
    probes = dict(y=torch.ones(*a["x"].shape, dtype=torch.float64, device=device),
                  final=torch.ones(*a["initial_states"].shape, dtype=torch.float64, device=device))  # fmt: skip
    with_views = _outputs_and_grads(ssd.ssd_scan, views, spec, probes)
    plain = _outputs_and_grads(ssd.ssd_scan, a, spec, probes)
    return max((with_views[k].double() - v.double()).abs().max().item() for k, v in plain.items())


def op_checks(device: str = "cpu") -> dict:
    """Our scan through model/kernels/cuda.py's custom ops (`_ssd_scan_for("triton")`), the path the model runs:
    errors against fp64 with the forward's states kept and recomputed ("op_kept", "op_recompute") and with raw dt
    discretised in the kernels ("op_dt_fused", d dt_bias included); the largest difference of y, the final state
    and the gradients between inductor (dynamic shapes, fake implementations checked against the real outputs'
    sizes and strides) and eager ("compiled"); torch.library.opcheck's failures on both ops ("opcheck")."""
    from model.kernels import cuda
    from model.settings import overridden

    _, scan = cuda._ssd_scan_for("triton")
    out = dict(op_kept=errors("packed_many_docs", device, scans={"op": scan})["op"])
    with overridden(ssd_recompute=True):
        out["op_recompute"] = errors("packed_many_docs", device, scans={"op": scan})["op"]
    out["op_dt_fused"] = errors("dt_fused", device, scans={"op": scan})["op"]
    spec = CASES["dt_fused"]  # every optional input of the op: a bias, softplus and limit, seq_idx, initial states
    a = inputs(spec, device)
    probes = dict(y=torch.ones(*a["x"].shape, dtype=torch.float64, device=device),
                  final=torch.ones(*a["initial_states"].shape, dtype=torch.float64, device=device))  # fmt: skip
    compiled = torch.compile(scan, backend="inductor", dynamic=True, fullgraph=True)
    eager, inductor = (_outputs_and_grads(fn, a, spec, probes) for fn in (scan, compiled))
    out["compiled"] = max((inductor[k].double() - v.double()).abs().max().item() for k, v in eager.items())
    out["opcheck"] = _opcheck_failures(a, spec)
    return out


def _fresh_leaf(t):
    """A floating tensor as a new leaf that takes a gradient; anything else (seq_idx, None) as it is."""
    return t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t


def _opcheck_failures(a: dict, spec: dict) -> list[str]:
    """torch.library.opcheck on our forward op (kept states and not) and its backward op → the failures' messages."""
    forward, backward = torch.ops.falcon_align.ssd_scan_triton.default, torch.ops.falcon_align.ssd_scan_triton_backward
    args = [a[k] for k in ("x", "dt", "A", "B", "C", "D", "initial_states", "seq_idx")]
    options = _options(spec)
    lo, hi = options.get("dt_limit", (0.0, float("inf")))
    discretize = [a.get("dt_bias"), options.get("dt_softplus", False), lo, hi]
    chunk = spec["chunk"]
    failures = []
    for keep in (True, False):
        fresh = [_fresh_leaf(t) for t in args]
        try:
            torch.library.opcheck(forward, (*fresh, chunk, keep, _fresh_leaf(discretize[0]), *discretize[1:]))
            with torch.no_grad():
                y, final, *kept = forward(*args, chunk, keep, *discretize)
            torch.library.opcheck(
                backward.default, (torch.ones_like(y), torch.ones_like(final), *args, y, *kept, chunk, *discretize)
            )
        except Exception as err:  # opcheck raises OpCheckError naming the failed test
            failures.append(f"{spec}, keep={keep}: {type(err).__name__}: {err}"[:2000])
    return failures


# fp32 tensors whatever the inputs' dtype (the rest follow x, B, C, dy)
_FP32_POINTERS = {"dtc_ptr", "cum_ptr", "st_ptr", "ds_ptr", "usuf_ptr", "red_ptr", "final_ptr", "init_ptr",
                  "dinit_ptr", "dfinal_ptr", "A_ptr", "D_ptr", "bias_ptr", "dt_ptr", "ddt_ptr"}  # fmt: skip


def hopper_builds(dtype: str, P: int, N: int, chunk: int = 128) -> dict:
    """Every kernel compiled for sm_90 (no GPU needed) with ssd.py's blocks and launch options, every flag on →
    {kernel: shared memory bytes}; a failed compile raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from model.kernels import ssd

    blk = ssd._blocks(chunk, P, N)
    flags = dict(HAS_SEQ=True, HAS_INIT=True, HAS_DFINAL=True, HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, LIMIT=True)
    tiles = dict(BLOCK_Q=blk.Q, BLOCK_P=blk.P, BLOCK_N=blk.n, BLOCK_T=blk.rows, BLOCK_S=blk.cols, BLOCK=1024)
    kernels = {
        "chunk_state": (ssd._chunk_state_fwd_kernel, {}),
        "state_passing": (ssd._state_passing_fwd_kernel, {}),
        "output": (ssd._chunk_output_fwd_kernel, dict(BLOCK_P=blk.p)),
        "dstate_out": (ssd._dstate_out_bwd_kernel, {}),
        "state_passing_bwd": (ssd._state_passing_bwd_kernel, {}),
        "dx": (ssd._chunk_dx_bwd_kernel, dict(BLOCK_S=blk.dx_cols)),
        "dC": (ssd._chunk_dC_bwd_kernel, {}),
        "dB": (ssd._chunk_dB_bwd_kernel, {}),
    }
    out = {}
    for name, (kernel, own) in kernels.items():
        constexprs = {**flags, **tiles, **own}
        signature, values = {}, {}
        for i, arg in enumerate(kernel.arg_names):
            if arg in constexprs:
                signature[arg], values[(i,)] = "constexpr", constexprs[arg]
            elif arg.endswith("_ptr"):
                signature[arg] = "*i32" if arg == "seq_ptr" else "*fp32" if arg in _FP32_POINTERS else f"*{dtype}"
            else:
                signature[arg] = "fp32" if arg in ("dt_min", "dt_max") else "i32"
        options = ssd.LAUNCH[name.removesuffix("_bwd")]
        built = triton.compile(ASTSource(kernel, signature, values), target=GPUTarget("cuda", 90, 32), options=options)
        out[name] = built.metadata.shared
    return out


def main(names: list[str]) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        from tests.model.triton_interpreter import patch

        patch()
    out = {name: errors(name) for name in names if name in CASES}
    if "recompute" in names:
        out["recompute"] = recompute_difference("dt_fused")
    if "strided" in names:
        out["strided"] = strided_difference("one_group_init")
    if "op" in names:
        out.update(op_checks())
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
