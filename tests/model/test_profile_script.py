"""`python -m bench profile` (bench/profile_step.py): kernel names fall into the right families, and the benchmark
runs end to end (CPU mode)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.profile_step import family, kernel_table


@pytest.mark.parametrize(
    "name, expected",
    [
        ("_chunk_scan_fwd_kernel", "SSD scan (mamba-ssm Triton)"),
        ("_chunk_state_bwd_db_kernel", "SSD scan (mamba-ssm Triton)"),
        ("_state_passing_fwd_kernel", "SSD scan (mamba-ssm Triton)"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMM"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "GEMM"),
        ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "norms"),
        ("triton_poi_fused_add_mul_silu_3", "fused elementwise (inductor / Triton)"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
            "elementwise (eager)",
        ),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
        ("Memcpy DtoD (Device -> Device)", "copies / fills / cat"),
    ],
)
def test_kernel_families(name, expected):
    assert family(name) == expected


def test_user_annotations_are_not_counted_as_kernels():
    """The optimizer's GPU-side range spans its kernels: counting both gave a busy time above the step time."""
    from types import SimpleNamespace

    import torch

    def event(key, ms, annotation=False):
        cuda = torch.autograd.DeviceType.CUDA
        return SimpleNamespace(key=key, count=2, device_type=cuda, self_device_time_total=ms * 2e3,
                               is_user_annotation=annotation)  # fmt: skip

    kernels = [event("multi_tensor_apply_kernel", 3.0), event("nvjet_sm90_tst_256x128", 5.0)]
    families, top, busy = kernel_table([*kernels, event("Optimizer.step#AdamW.step", 3.0, True)], 2, on_gpu=True)
    assert busy == 8.0 and [t["kernel"] for t in top] == ["nvjet_sm90_tst_256x128", "multi_tensor_apply_kernel"]


def test_profile_script_runs_on_cpu(tmp_path):
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "p.json"
    trace = tmp_path / "trace.json"
    # compiled-eager: the layers through compile_layers (aot_eager on CPU), as `compile_layers: true` runs them
    command = [sys.executable, "-m", "bench", "profile", "--tiny", "--seq", "48", "--mode", "compiled-eager"]
    command += ["--packed-docs", "3", "--top", "5", "--trace", str(trace), "--out", str(out)]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert len(record["top_kernels"]) == 5 and json.loads(trace.read_text())["traceEvents"]
    assert record["step_ms"] > 0 and record["busy_ms_per_step"] > 0
    assert abs(sum(f["share"] for f in record["families"]) - 1) < 1e-2
    assert {"GEMM", "attention"} <= {f["family"] for f in record["families"]}
    assert record["command"] == "python -m bench " + " ".join(command[3:]) and record["card"] == "cpu"
    # packed rows: the documents' boundaries are found on the host's side of the device (one read a forward)
    assert record["syncs_per_step"].get("aten::_local_scalar_dense", 0) >= 1 and record["wall_ms_per_step_profiled"] > 0
