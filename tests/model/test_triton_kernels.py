"""Our Triton kernels (model/kernels/state_update.py, gated_norm.py) on CPU, in Triton's interpreter, against their
reference twins in fp64 (tests/model/triton_checks.py; the GPU runs the same checks compiled, in test_gpu.py), and
the provider choice (model.settings.kernels) that routes to them.

TRITON_INTERPRET is read when triton is imported, so the kernels run in a fresh interpreter with it set. Tolerances
(‖ours − fp64 reference‖∞ / ‖fp64 reference‖∞): fp32 1e-5; bf16 1e-2, one bf16 step, as the interpreter truncates
fp32 → bf16 where the GPU rounds to nearest (half a step).
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from model import settings
from model.kernels import REFERENCE, cuda, get_ops
from model.kernels.ref import rmsnorm_gated_ref, selective_state_update_ref
from tests.model.triton_checks import rmsnorm_gated_errors, state_update_errors
from tests.model.triton_interpreter import run_json

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed (PyTorch's CUDA wheels bring it; `pip install triton` on CPU)"
)
TOL = {"fp32": 1e-5, "bf16": 1e-2}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def interpreted():
    """tests/model/triton_checks.py run once in Triton's interpreter → its JSON record."""
    return run_json("tests.model.triton_checks", timeout=600)


def _over(errors: dict, tol: float) -> dict:
    return {case: err for case, err in errors.items() if not err < tol}  # `not <`: a NaN is over too


@needs_triton
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_state_update_matches_reference(interpreted, dtype):
    """y and the state updated in place, for 1 and 2 groups, odd head and state sizes, strided x, B, C (the mixer's
    split), with and without D, z, dt bias + softplus and a dt limit."""
    errors = interpreted[f"state_update/{dtype}"]
    assert len(errors) == 2 * 4 * 2  # shapes × options × (y, state)
    assert not _over(errors, TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gated_norm_forward_and_backward_match_reference(interpreted, dtype):
    """y and the gradients of x, z and weight; one group, two, and three of a size that is not a power of two; the
    gate before and after the norm; without z; z a strided view (the mixer's split of in_proj)."""
    errors = interpreted[f"rmsnorm_gated/{dtype}"]
    assert len(errors) == 3 * 2 * (4 + 3)  # group sizes × gate placements × (gated: y, dx, dw, dz; ungated: 3)
    assert not _over(errors, TOL[dtype])


@needs_triton
def test_ops_compile_whole_and_pass_opcheck(interpreted):
    """Under torch.compile(fullgraph=True) both ops give eager's numbers (the fake implementations agree, no graph
    break, the state written in place); torch.library.opcheck passes: schema and declared mutation, fake tensors,
    autograd registration, AOT dispatch."""
    assert len(interpreted["compiled"]) == 2 + 4
    assert not _over(interpreted["compiled"], 1e-6)
    assert interpreted["opcheck_failures"] == []


@needs_triton
def test_model_on_our_kernels_equals_the_reference_path(interpreted):
    """A tiny Falcon-H1 (2 groups; the gate before and after the norm) with our two kernels in place of the reference
    ops, fp32: every gradient of a training step equals the reference path's, and a cached prefill, a chunk on the
    non-empty cache and 8 decode steps (our state update) give the full forward's logits."""
    errors = interpreted["model"]
    assert len(errors) == 2 * (1 + 37)  # gate placements × (cached logits, every parameter's gradient)
    assert not _over(errors, 1e-5)


def test_checks_catch_a_wrong_twin():
    """The checks above fail a kernel that is wrong in one detail: a gate applied after the norm instead of before, a
    missing skip, a state that is not written back."""

    def gate_misplaced(x, z, weight, eps, group_size, norm_before_gate=False):
        return rmsnorm_gated_ref(x, z, weight, eps, group_size, not norm_before_gate)

    def no_skip(state, x, dt, A, B, C, D=None, **kw):
        return selective_state_update_ref(state, x, dt, A, B, C, **kw)

    def state_untouched(state, *args, **kw):
        return selective_state_update_ref(state.clone(), *args, **kw)

    norm = rmsnorm_gated_errors(gate_misplaced)
    assert min(norm[k] for k in norm if "no z" not in k and "/y" in k) > 0.05
    skip = state_update_errors(no_skip)
    assert min(skip[k] for k in skip if "D" in k and k.endswith("/y")) > 0.05
    assert max(skip[k] for k in skip if k.endswith("/state")) < 1e-6  # only the skip is wrong
    untouched = state_update_errors(state_untouched)
    assert min(untouched[k] for k in untouched if k.endswith("/state")) > 0.05
    assert max(untouched[k] for k in untouched if k.endswith("/y")) < 1e-6


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine where CUDA is available, mamba-ssm and causal-conv1d are not, and PyTorch's varlen attention is
    absent: what `get_ops("cuda")` routes to, for each provider."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "import_mamba_triton", lambda: None)
    monkeypatch.setattr(cuda, "_varlen_attention", lambda: None)
    monkeypatch.setitem(sys.modules, "causal_conv1d", None)

    def ops_for(provider):
        settings.configure(kernels=provider)  # forgets the cached choice
        return get_ops("cuda")

    with settings.overridden():  # restores the provider after the test
        yield ops_for


def _without_triton(monkeypatch):
    """triton hidden; our kernel modules forgotten (in sys.modules and as attributes of model.kernels, both restored
    after the test, so later tests get the modules built with triton)."""
    import model.kernels

    monkeypatch.setitem(sys.modules, "triton", None)
    for name in ("state_update", "gated_norm", "ssd"):
        monkeypatch.delitem(sys.modules, f"model.kernels.{name}", raising=False)
        monkeypatch.delattr(model.kernels, name, raising=False)


@needs_triton
def test_auto_runs_our_triton_kernels_without_mamba_ssm(fake_cuda, monkeypatch):
    from model.kernels.gated_norm import rmsnorm_gated
    from model.kernels.state_update import selective_state_update

    monkeypatch.setattr(cuda, "_triton_ssd_scan", lambda: "our scan")
    for provider in ("auto", "triton"):
        ops = fake_cuda(provider)
        assert ops.name == "cuda[rmsnorm_gated:triton,selective_state_update:triton,ssd_scan:triton]" and ops.fast
        assert (ops.selective_state_update, ops.rmsnorm_gated) == (selective_state_update, rmsnorm_gated)
        assert ops.ssd_scan == "our scan"  # model/kernels/ssd.py
        # the conv is the reference (inductor fuses it under compile)
        for name in ("causal_conv1d", "causal_conv1d_update", "varlen_attention"):
            assert getattr(ops, name) is getattr(REFERENCE, name), name


def test_explicit_providers_that_cannot_run_are_errors(fake_cuda, monkeypatch):
    with pytest.raises(RuntimeError, match=r"kernels='mamba-ssm' but mamba-ssm's Triton kernels do not import"):
        fake_cuda("mamba-ssm")
    _without_triton(monkeypatch)
    with pytest.raises(RuntimeError, match=r"kernels='triton' but triton does not import here"):
        fake_cuda("triton")
    assert fake_cuda("auto") is REFERENCE  # auto takes what imports: here nothing
    assert fake_cuda("reference") is REFERENCE


def test_mamba_ssm_provider_takes_its_kernels_and_causal_conv1d(fake_cuda, monkeypatch):
    """Stand-ins for mamba-ssm's modules and causal-conv1d: the provider "mamba-ssm" routes the state update, the
    gated norm and the scan to mamba-ssm, the conv to causal-conv1d; "auto" takes none of them but the scan."""
    import types

    calls = []
    ssu = types.SimpleNamespace(selective_state_update=lambda *a, **k: calls.append("ssu"))
    norm = types.SimpleNamespace(rmsnorm_fn=lambda x, *a, **k: calls.append("norm") or x)
    monkeypatch.setattr(cuda, "import_mamba_triton", lambda: ("ssd_combined", ssu, norm))
    monkeypatch.setattr(cuda, "_ssd_scan", lambda ssd_combined: f"scan from {ssd_combined}")
    conv = types.ModuleType("causal_conv1d")
    conv.causal_conv1d_fn = conv.causal_conv1d_update = lambda *a, **k: calls.append("conv")
    monkeypatch.setitem(sys.modules, "causal_conv1d", conv)
    ops = fake_cuda("mamba-ssm")
    assert ops.name == (
        "cuda[causal_conv1d:causal-conv1d,causal_conv1d_update:causal-conv1d,rmsnorm_gated:mamba-ssm,"
        "selective_state_update:mamba-ssm,ssd_scan:mamba-ssm]"
    )
    assert ops.ssd_scan == "scan from ssd_combined"
    x = torch.zeros(1, 2, 3)
    ops.rmsnorm_gated(x, x, torch.ones(3), 1e-5, 3)
    ops.causal_conv1d_update(x[0], x[0], torch.ones(2, 3))
    assert calls == ["norm", "conv"]
    if HAS_TRITON:
        ops = fake_cuda("auto")
        assert ops.name == "cuda[rmsnorm_gated:triton,selective_state_update:triton,ssd_scan:mamba-ssm]"
        assert ops.causal_conv1d is REFERENCE.causal_conv1d


@needs_triton
def test_kernels_reject_mismatched_shapes():
    from model.kernels.gated_norm import MAX_GROUP, rmsnorm_gated
    from model.kernels.state_update import selective_state_update

    x = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match=r"selective_state_update: state \(2, 4, 3, 6\).*G dividing H"):
        selective_state_update(
            torch.zeros(2, 4, 3, 6), x, torch.zeros(2, 4), torch.zeros(4), *[torch.zeros(2, 3, 5)] * 2
        )
    with pytest.raises(ValueError, match=r"rmsnorm_gated: x \(2, 4, 3\), z None, weight \(3,\), group_size 2"):
        rmsnorm_gated(x, None, torch.ones(3), 1e-5, 2)
    with pytest.raises(ValueError, match=f"group_size {2 * MAX_GROUP} > {MAX_GROUP}"):
        rmsnorm_gated(torch.zeros(1, 2 * MAX_GROUP), None, torch.ones(2 * MAX_GROUP), 1e-5, 2 * MAX_GROUP)


@needs_triton
def test_kernel_softplus_is_torchs(interpreted):
    """The state update's softplus (log1p's accuracy without libdevice, which the interpreter lacks) against
    F.softplus in fp64 over -40 … 40, relative to each value."""
    assert interpreted["softplus"] < 1e-6
