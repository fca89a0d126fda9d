"""Our SSD kernels (model/kernels/ssd.py) against the reference scan in fp64: y, the final state and the gradient of
every input (x, dt, A, B, C, D, the initial state, dt_bias where the discretisation is fused), with packed documents
(many short ones), lengths that are not multiples of the chunk, a chunk that is not a power of two, 1 and 2 groups,
x / B / C read as strided views of the conv output, and the backward with and without the forward's kept states.
The cases are tests/model/ssd_cases.py.

On CPU the kernels run in Triton's interpreter, in a subprocess (the interpreter is chosen when the kernels are
defined), once for every case: tolerances there, relative to the largest true value: fp32 1e-5 (the interpreter's
dots are exact fp32; measured ≤ 2.1e-6), bf16 1e-2 (measured ≤ 4.2e-3). On a GPU (marker `gpu`) the same cases and
the released head sizes run natively: fp32 5e-3 (Triton's fp32 dots are tf32), bf16 3e-2 and, where mamba-ssm is
installed, no less accurate than its kernels on the same bf16 inputs (25% and 1e-6 of slack for ties in rounding).
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from tests.model import ssd_cases
from tests.model.ssd_cases import CASES, GPU_CASES
from tests.model.triton_interpreter import run_json

ROOT = Path(__file__).resolve().parents[2]
TRITON = importlib.util.find_spec("triton")
FP32_CASES = [name for name, spec in CASES.items() if spec.get("dtype", "float32") == "float32"]
INTERPRETED_TOL = {"float32": 1e-5, "bfloat16": 1e-2}
GPU_TOL = {"float32": 5e-3, "bfloat16": 3e-2}


def _expected(spec: dict) -> set[str]:
    """Every quantity a case must report: y, the final state, and a gradient for each input it has."""
    names = {"y", "final", "dx", "ddt", "dA", "dB", "dC"}
    names |= {"dD"} if spec.get("D", True) else set()
    names |= {"dinitial_states"} if spec.get("init") else set()
    return names | ({"ddt_bias"} if spec.get("fused") else set())


def _too_large(errs: dict, tol: float) -> dict:
    return {k: v for k, v in errs.items() if not v < tol}


def _interpret(*checks: str) -> dict:
    """`python -m tests.model.ssd_cases <checks>` under TRITON_INTERPRET=1 → its JSON."""
    if TRITON is None:
        pytest.skip("triton is not installed: the kernels' CPU checks run in Triton's interpreter")
    if torch.cuda.is_available():
        pytest.skip("a GPU runs the kernels natively (test_gpu_*)")
    return run_json("tests.model.ssd_cases", *checks, timeout=1800)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """Every case's errors from one subprocess."""
    return _interpret(*CASES, "recompute", "strided")


@pytest.fixture(scope="module")
def interpreted_op() -> dict:
    """The custom-op checks (tests/model/ssd_cases.py `op_checks`) from one subprocess."""
    return _interpret("op")


@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_kernels_match_reference(interpreted, case):
    spec, errs = CASES[case], interpreted[case]["ours"]
    assert set(errs) == _expected(spec)
    assert _too_large(errs, INTERPRETED_TOL[spec.get("dtype", "float32")]) == {}


def test_interpreted_backward_recomputes_what_the_forward_keeps(interpreted):
    assert interpreted["recompute"] == 0.0


def test_interpreted_strided_views_read_like_contiguous_tensors(interpreted):
    assert interpreted["strided"] == 0.0


@pytest.mark.slow  # about a minute: inductor compiles on CPU, opcheck runs each op a dozen times
def test_interpreted_custom_ops(interpreted_op):
    """What the model runs: model/kernels/cuda.py's op pair over our kernels, eager with kept and with recomputed
    states, compiled (inductor, dynamic shapes) equal to eager, and torch.library.opcheck on both ops."""
    for name, case in (
        ("op_kept", "packed_many_docs"),
        ("op_recompute", "packed_many_docs"),
        ("op_dt_fused", "dt_fused"),
    ):
        assert set(interpreted_op[name]) == _expected(CASES[case]), name  # d dt_bias among them when fused
        assert _too_large(interpreted_op[name], INTERPRETED_TOL["float32"]) == {}, name
    assert interpreted_op["compiled"] == 0.0
    assert interpreted_op["opcheck"] == []


# the released head sizes: 0.5B (P 64, N 128), 1.5B and 1.5B-Deep (64, 256), 3B to 34B (128, 256); fp32 for the tests
HOPPER_SHAPES = [("bf16", 64, 128), ("bf16", 64, 256), ("bf16", 128, 256), ("fp32", 64, 128), ("fp32", 16, 16)]
HOPPER_SHARED_BYTES = 227 * 1024  # an H100's or H200's shared memory per block


@pytest.mark.parametrize("dtype, P, N", HOPPER_SHAPES)
def test_kernels_build_for_hopper(dtype, P, N):
    """What the interpreter cannot check: every kernel compiles for sm_90 (Triton's compiler and ptxas, no GPU) and
    fits a Hopper block's shared memory (before the launch options of ssd.LAUNCH, the backward's per-head kernel took
    254 KB at P 128, N 256 and 369 KB in fp32)."""
    if TRITON is None or importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton with its NVIDIA backend is not installed")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the kernels were defined for the interpreter")
    shared = ssd_cases.hopper_builds(dtype, P, N)
    assert len(shared) == 8 and {k: v for k, v in shared.items() if v > HOPPER_SHARED_BYTES} == {}


def test_bad_shapes_are_errors_naming_the_tensor():
    from model.kernels import ssd

    a = ssd_cases.inputs(CASES["one_group_init"])
    with pytest.raises(ValueError, match=r"initial_states \(1, 4, 16, 8\), want \(1, 4, 16, 16\)"):
        ssd.ssd_forward(a["x"], a["dt"], a["A"], a["B"], a["C"], 32, initial_states=a["initial_states"][..., :8])
    with pytest.raises(ValueError, match=r"dt \(1, 90, 3\)"):
        ssd.ssd_forward(a["x"], a["dt"][..., :3], a["A"], a["B"], a["C"], 32)
    with pytest.raises(ValueError, match="4 heads do not split into 3 groups"):
        B = a["B"].expand(-1, -1, 3, -1)
        ssd.ssd_forward(a["x"], a["dt"], a["A"], B, B, 32)


# ---------------------------------------------------------------- on a GPU

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or TRITON is None, reason="needs CUDA and triton")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", list(CASES) + list(GPU_CASES))
def test_gpu_kernels_match_reference(case):
    spec = {**CASES, **GPU_CASES}[case]
    low = spec.get("dtype", "float32") != "float32"
    out = ssd_cases.errors(case, "cuda", scans=_mamba_scan() if low and case in GPU_CASES else None)
    errs = out["ours"]
    assert set(errs) == _expected(spec)
    assert _too_large(errs, GPU_TOL[spec.get("dtype", "float32")]) == {}
    if "mamba" in out:  # as accurate as mamba-ssm's kernels against fp64, quantity by quantity
        theirs = out["mamba"]
        assert {k: (v, theirs[k]) for k, v in errs.items() if k in theirs and not v <= 1.25 * theirs[k] + 1e-6} == {}


def _mamba_scan() -> dict:
    """{"mamba": mamba-ssm's kernels through the same op boundary} where mamba-ssm imports."""
    from model.kernels import cuda

    chosen = cuda._ssd_scan_for("mamba-ssm")
    return {} if chosen is None else {"mamba": chosen[1]}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", ["recompute", "strided"])
def test_gpu_recompute_and_strided_views(case):
    if case == "recompute":
        assert ssd_cases.recompute_difference("dt_fused", "cuda") == 0.0
    else:
        assert ssd_cases.strided_difference("one_group_init", "cuda") == 0.0


@pytest.mark.gpu
@needs_gpu
def test_gpu_custom_ops():
    out = ssd_cases.op_checks("cuda")
    for name in ("op_kept", "op_recompute", "op_dt_fused"):
        assert _too_large(out[name], GPU_TOL["float32"]) == {}, name
    assert out["compiled"] < 1e-5 and out["opcheck"] == []
