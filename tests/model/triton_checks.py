"""A fast twin of `selective_state_update` or `rmsnorm_gated` against its reference (model/kernels/ref.py) in fp64 on
the same inputs: shared by the CPU tests (tests/model/test_triton_kernels.py, our kernels in Triton's interpreter)
and the GPU tests (tests/model/test_gpu.py, ours and mamba-ssm's on the card).

Each check returns {case: relative error ‖fast − fp64 reference‖∞ / ‖fp64 reference‖∞}, one entry per output and
gradient, so a test can state a tolerance per dtype and compare two fast twins case by case.

    python -m tests.model.triton_checks      # our kernels, CPU, in Triton's interpreter → JSON (TRITON_INTERPRET=1)
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from model.kernels.ref import rmsnorm_gated_ref, selective_state_update_ref
from tests.conftest import rel_err

try:  # the checks of other twins run without triton
    import triton
    import triton.language as tl

    from model.kernels.state_update import softplus
except ImportError:
    triton = None
else:

    @triton.jit
    def _softplus_kernel(v_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, softplus(tl.load(v_ptr + i, mask=i < n)), mask=i < n)


# (b, H, P, G, N): odd sizes on CPU (masks on every axis), the released head and state sizes on GPU
STATE_SHAPES = {"cpu": [(2, 4, 6, 1, 5), (3, 4, 3, 2, 8)], "cuda": [(3, 24, 64, 1, 128), (2, 32, 128, 2, 256)]}
# (rows, d, group sizes): on GPU the released norms (d_ssm / n_groups: 1536 … 4096)
NORM_SHAPES = {"cpu": [(7, 24, (24, 12, 8))], "cuda": [(300, 3072, (3072, 1536)), (129, 4096, (2048,))]}
STATE_OPTIONS = {
    "plain": dict(),
    "D": dict(D=True),
    "D+z+softplus": dict(D=True, z=True, dt_bias=True, dt_softplus=True),
    "D+z+softplus+limit": dict(D=True, z=True, dt_bias=True, dt_softplus=True, dt_limit=(0.01, 0.3)),
}


def _randn(gen, *shape, device, dtype):
    return torch.randn(*shape, generator=gen, device=device).to(dtype)


def _state_inputs(shape, options, device, dtype, seed):
    """The mixer's decode-step inputs: x, B, C as columns of one wider row (strided views, as its split gives)."""
    b, H, P, G, N = shape
    gen = torch.Generator(device).manual_seed(seed)
    xBC = _randn(gen, b, H * P + 2 * G * N + 3, device=device, dtype=dtype)  # 3 spare columns: not contiguous views
    x, B, C = xBC[:, : H * P], xBC[:, H * P : H * P + G * N], xBC[:, H * P + G * N : -3]
    raw_dt = torch.randn(b, H, generator=gen, device=device) - (3.0 if options.get("dt_softplus") else 0.0)
    args = dict(
        x=x.view(b, H, P),
        dt=raw_dt if options.get("dt_softplus") else F.softplus(raw_dt),  # plain: dt is already positive
        A=-torch.rand(H, generator=gen, device=device) * 4 - 0.1,
        B=B.view(b, G, N),
        C=C.view(b, G, N),
    )
    if options.get("D"):
        args["D"] = torch.randn(H, generator=gen, device=device)
    if options.get("z"):
        args["z"] = _randn(gen, b, H, P, device=device, dtype=dtype)
    if options.get("dt_bias"):
        args["dt_bias"] = torch.randn(H, generator=gen, device=device)
    for name in ("dt_softplus", "dt_limit"):
        if name in options:
            args[name] = options[name]
    state = torch.randn(b, H, P, N, generator=gen, device=device)
    return state, args


def _fp64(args):
    return {k: v.double() if torch.is_tensor(v) else v for k, v in args.items()}


def state_update_errors(fn, device="cpu", dtype=torch.float32) -> dict[str, float]:
    """`fn` (the signature of selective_state_update_ref) with inputs in `dtype` and an fp32 state, against the
    reference in fp64 on the same values: the error of y and of the state it updates in place."""
    errors = {}
    for shape in STATE_SHAPES[device]:
        for seed, (name, options) in enumerate(STATE_OPTIONS.items()):
            state, args = _state_inputs(shape, options, device, dtype, seed)
            want_state = state.double()
            want_y = selective_state_update_ref(want_state, **_fp64(args))
            y = fn(state, **args)
            assert y.dtype == dtype and y.shape == args["x"].shape, (y.dtype, y.shape)
            case = f"{shape}/{name}"
            errors[f"{case}/y"] = rel_err(y, want_y)
            errors[f"{case}/state"] = rel_err(state, want_state)
    return errors


def _norm_inputs(rows, d, device, dtype, seed):
    """x (rows, d); z as columns of one wider row (a strided view, as the mixer's split of in_proj gives); weight."""
    gen = torch.Generator(device).manual_seed(seed)
    x = _randn(gen, 2, rows, d, device=device, dtype=dtype)
    z = _randn(gen, 2, rows, d + 5, device=device, dtype=dtype)[..., 2 : d + 2]
    w = (1 + 0.5 * torch.randn(d, generator=gen, device=device)).to(dtype)
    dy = _randn(gen, 2, rows, d, device=device, dtype=dtype)
    return x, z, w, dy


def _norm_and_grads(fn, x, z, w, dy, group, before):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    z = None if z is None else z.detach().requires_grad_()
    y = fn(x, z, w, 1e-5, group, norm_before_gate=before)
    inputs = [x, w] + ([] if z is None else [z])
    grads = torch.autograd.grad(y, inputs, dy)
    return dict(zip(("y", "dx", "dw", "dz"), (y, *grads)))


def rmsnorm_gated_errors(fn, device="cpu", dtype=torch.float32) -> dict[str, float]:
    """`fn` (the signature of rmsnorm_gated_ref) with inputs in `dtype`, forward and the gradients of x, z and weight,
    against the reference in fp64 on the same values; gate before and after the norm, with and without z."""
    errors = {}
    for seed, (rows, d, groups) in enumerate(NORM_SHAPES[device]):
        x, z, w, dy = _norm_inputs(rows, d, device, dtype, seed)
        for group in groups:
            for before in (False, True):
                for gated in (True, False):
                    zz = z if gated else None
                    want = _norm_and_grads(
                        rmsnorm_gated_ref, x.double(), _maybe(zz), w.double(), dy.double(), group, before
                    )
                    got = _norm_and_grads(fn, x, zz, w, dy, group, before)
                    case = f"{rows}x{d}/group {group}/{'norm-then-gate' if before else 'gate-then-norm'}"
                    case += "" if gated else "/no z"
                    for name, value in got.items():
                        assert value.dtype == dtype, (case, name, value.dtype)
                        errors[f"{case}/{name}"] = rel_err(value, want[name])
    return errors


def _maybe(t):
    return None if t is None else t.double()


def compiled_errors(device="cpu") -> dict[str, float]:
    """Our ops under torch.compile(fullgraph=True) against eager: the fake implementations agree with the kernels,
    no graph breaks, the state written in place. CPU: aot_eager (the interpreter runs the kernels); CUDA: inductor."""
    from model.kernels.gated_norm import rmsnorm_gated
    from model.kernels.state_update import selective_state_update

    backend = "inductor" if device == "cuda" else "aot_eager"
    errors = {}
    state, args = _state_inputs(STATE_SHAPES[device][1], STATE_OPTIONS["D+z+softplus+limit"], device, torch.float32, 0)
    state_c = state.clone()
    y = selective_state_update(state, **args)
    step = torch.compile(lambda s, a: selective_state_update(s, **a) * 2, backend=backend, fullgraph=True)
    y_c = step(state_c, args) / 2
    errors["state update/y"], errors["state update/state"] = rel_err(y_c, y), rel_err(state_c, state)

    rows, d, groups = NORM_SHAPES[device][0]
    x, z, w, dy = _norm_inputs(rows, d, device, torch.float32, 1)
    norm = torch.compile(lambda *a, **k: rmsnorm_gated(*a, **k) * 1.5, backend=backend, fullgraph=True)
    got = _norm_and_grads(norm, x, z, w, dy, groups[-1], False)
    want = _norm_and_grads(lambda *a, **k: rmsnorm_gated(*a, **k) * 1.5, x, z, w, dy, groups[-1], False)
    errors.update({f"rmsnorm_gated/{k}": rel_err(got[k], want[k]) for k in want})
    return errors


def opcheck_failures(device="cpu") -> list[str]:
    """torch.library.opcheck on our three custom ops (schema and declared mutation, fake tensors, autograd
    registration, AOT dispatch): the names of the checks that fail, with their message."""
    from model.kernels import gated_norm, state_update

    state, args = _state_inputs(STATE_SHAPES[device][0], STATE_OPTIONS["D+z+softplus+limit"], device, torch.float32, 3)
    a = args
    ssu = (state, a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], a["dt_bias"], True, 0.01, 0.3)
    d = 24 if device == "cpu" else 256
    x, z, w, dy = _norm_inputs(5, d, device, torch.float32, 4)
    x, z, dy = (t.reshape(-1, d).contiguous() for t in (x, z, dy))  # the ops take (rows, d)
    group = d // 2
    _, rstd = gated_norm._forward_op(x, z, w, 1e-5, group, False)
    leaves = [t.clone().requires_grad_() for t in (x, z, w)]
    cases = {
        "selective_state_update": (state_update._state_update_op, ssu),
        "rmsnorm_gated": (gated_norm._forward_op, (*leaves, 1e-5, group, False)),
        "rmsnorm_gated_backward": (gated_norm._backward_op, (dy, x, z, w, rstd, group, False)),
    }
    failures = []
    for name, (op, op_args) in cases.items():
        results = torch.library.opcheck(op, op_args, raise_exception=False)
        failures += [f"{name}: {test}: {result}" for test, result in results.items() if result != "SUCCESS"]
    return failures


def softplus_error() -> float:
    """The state update's softplus over -40 … 40 against F.softplus in fp64: the largest error relative to each value."""
    v = torch.linspace(-40, 40, 8001)
    out = torch.empty_like(v)
    _softplus_kernel[(triton.cdiv(v.numel(), 1024),)](v, out, v.numel(), BLOCK=1024)
    want = F.softplus(v.double())
    return ((out.double() - want).abs() / want).max().item()


def model_errors() -> dict[str, float]:
    """A tiny Falcon-H1 (2 groups, the gate before and after the norm) on the reference ops with our two kernels in
    place, against the reference ops alone, fp32: the loss and every gradient of a training step; logits of a cached
    prefill, a chunk on the non-empty cache and decode steps (the state update) against the full forward."""
    from dataclasses import replace

    import model.modeling as modeling
    from model.kernels import REFERENCE
    from model.kernels.gated_norm import rmsnorm_gated
    from model.kernels.state_update import selective_state_update
    from tests.conftest import tiny_model

    ours = replace(REFERENCE, selective_state_update=selective_state_update, rmsnorm_gated=rmsnorm_gated)
    ids = torch.randint(1, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    errors = {}
    for before in (False, True):
        model = tiny_model(seed=2, mamba_n_groups=2, mamba_norm_before_gate=before, time_step_limit=(0.01, 0.5))
        runs = {}
        for name, ops in (("ours", ours), ("reference", REFERENCE)):
            modeling.get_ops = lambda device, ops=ops: ops
            model.zero_grad()
            model(ids, labels=ids).loss.backward()
            runs[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
            with torch.no_grad():
                full = model(ids, use_cache=False).logits
                out = model(ids[:, :10], use_cache=True)
                cache = out.past_key_values
                steps = [out.logits, model(ids[:, 10:16], past_key_values=cache).logits]
                steps += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(16, 24)]
            if name == "ours":
                errors[f"gate {'after' if before else 'before'} the norm/cached logits"] = rel_err(
                    torch.cat(steps, 1), full
                )
        for n, grad in runs["reference"].items():
            errors[f"gate {'after' if before else 'before'} the norm/grad {n}"] = rel_err(runs["ours"][n], grad)
    return errors


def main():
    """Our kernels on CPU (run under TRITON_INTERPRET=1): every error and failure as one JSON object."""
    from model.kernels.gated_norm import rmsnorm_gated
    from model.kernels.state_update import selective_state_update

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    record = {
        **{f"state_update/{k}": state_update_errors(selective_state_update, "cpu", t) for k, t in dtypes.items()},
        **{f"rmsnorm_gated/{k}": rmsnorm_gated_errors(rmsnorm_gated, "cpu", t) for k, t in dtypes.items()},
        "compiled": compiled_errors("cpu"),
        "opcheck_failures": opcheck_failures("cpu"),
        "softplus": softplus_error(),
        "model": model_errors(),
    }
    errors = [v for part in record.values() if isinstance(part, dict) for v in part.values()] + [record["softplus"]]
    assert all(math.isfinite(v) for v in errors), record
    print(json.dumps(record))


if __name__ == "__main__":
    main()
