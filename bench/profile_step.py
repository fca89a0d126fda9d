"""Where a training step's time goes: ours on one micro-batch, profiled kernel by kernel.

    python -m bench profile --preset 0.5b --seq 8192 --mode compiled --out <json>
    python -m bench profile --preset 1.5b-deep --seq 8192 --mode graphs
    python -m bench profile --preset 0.5b --seq 8192 --packed-docs 4 --mode compiled   # the Trainer's packed rows

Modes: `eager`, `graphs` (per-layer CUDA graphs), `compiled` (compiled layers inside the graphs) — the columns
of docs/performance.md — and `compiled-eager` (`compile_layers`, what `compile_layers: true` runs in the
Trainer; its kernels keep their CPU ops in a `--trace`). After warm-up (and capture), `--steps` steps are timed
(the step time: their mean), then as many run under torch.profiler; every GPU kernel's time is summed by family
(GEMM, attention, the SSD scan, conv, norms, fused/eager elementwise, optimizer, copies) and the GPU's busy share
of the step is reported: a step much longer than its kernels is launch-bound, a busy GPU is kernel-bound, and the
families then say which kernels. `--tiny` profiles a 2-layer model on CPU (CPU ops instead of kernels), a smoke
test of this benchmark.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench import common
from model import FalconH1Config, preset_config

# first match wins; names of cuBLAS/CUTLASS, flash, mamba-ssm Triton, inductor and ATen kernels
FAMILIES = (
    ("SSD scan (mamba-ssm Triton)", r"chunk_scan|chunk_state|state_passing|chunk_cumsum|bmm_chunk|_ssd|_ddt|_dcb|dda"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("GEMM", r"gemm|cutlass|xmma|nvjet|cublas|wgmma|aten::mm|aten::addmm|aten::bmm|aten::linear|matmul"),
    ("causal conv", r"conv"),
    ("norms", r"norm|rms|rsqrt"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("loss / softmax", r"softmax|cross_entropy|nll|logsumexp"),
    ("copies / fills / cat", r"memcpy|memset|copy|fill|cat|index|gather|scatter"),
    ("fused elementwise (inductor / Triton)", r"^triton_|fused"),
    ("elementwise (eager)", r"elementwise|vectorized|unrolled|reduce|aten::"),
)


def family(name: str) -> str:
    low = name.lower()
    for label, pattern in FAMILIES:
        if re.search(pattern, low):
            return label
    return "other"


def kernel_table(events, steps: int, on_gpu: bool, top: int = 40) -> tuple[list[dict], list[dict], float]:
    """profiler key_averages() → (families, top kernels, busy ms per step). GPU: kernels' self device time;
    CPU: ops' self CPU time."""
    per_name = []
    for e in events:
        if on_gpu:
            # a user annotation (the optimizer's "Optimizer.step#AdamW.step" range) spans kernels counted already
            if e.device_type != torch.autograd.DeviceType.CUDA or getattr(e, "is_user_annotation", False):
                continue
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        else:
            us = e.self_cpu_time_total
        if us > 0:
            per_name.append((e.key, e.count, us / 1e3 / steps))
    busy = sum(ms for _, _, ms in per_name)
    groups = defaultdict(lambda: [0.0, 0])
    for name, count, ms in per_name:
        g = groups[family(name)]
        g[0] += ms
        g[1] += count // steps
    families = [
        dict(family=k, ms_per_step=round(v[0], 3), share=round(v[0] / busy, 4), kernels_per_step=v[1])
        for k, v in sorted(groups.items(), key=lambda kv: -kv[1][0])
    ]
    top = [
        dict(kernel=name[:120], family=family(name), ms_per_step=round(ms, 3), calls_per_step=count // steps)
        for name, count, ms in sorted(per_name, key=lambda r: -r[2])[:top]
    ]
    return families, top, busy


# host-device syncs: each stops the host from queueing work ahead of the GPU
SYNCS = ("aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def syncs_per_step(events, steps: int) -> dict:
    return {e.key: round(e.count / steps, 1) for e in events if e.key in SYNCS and e.count}


def build(args, device):
    if args.tiny:
        from tests.conftest import tiny_kwargs

        cfg = FalconH1Config(**tiny_kwargs())
    else:
        cfg = preset_config(args.preset)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    return cfg, common.build(cfg, "ours", device=device, dtype=dtype).train()


def prepare(model, args, on_gpu: bool) -> None:
    """The mode's way of running the layers."""
    if args.mode == "compiled-eager":  # compiled layers launched one by one: kernels keep their CPU ops
        model.compile_layers()  # inductor on CUDA, aot_eager on CPU (--tiny)
    elif on_gpu and args.mode != "eager":
        from model.graphs import enable_training_graphs

        docs = args.packed_docs or None
        enable_training_graphs(model, 1, args.seq, max_docs=docs, compile=args.mode == "compiled")


def parser() -> argparse.ArgumentParser:
    ap = common.new_parser("profile", __doc__, "0.5b")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--mode", choices=("eager", "graphs", "compiled", "compiled-eager"), default="compiled")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--packed-docs", type=int, default=0, help="rows of this many documents (the Trainer's packing)")
    ap.add_argument("--tiny", action="store_true", help="2-layer model on CPU: a smoke test of this benchmark")
    ap.add_argument("--top", type=int, default=40, help="how many kernels to list by time")
    ap.add_argument("--trace", default=None, help="also write a Chrome trace of the profiled steps here")
    return ap


def main(argv: list[str]) -> dict:
    args = common.parse(parser(), argv)
    on_gpu = not args.tiny
    device = torch.device("cuda" if on_gpu else "cpu")
    cfg, model = build(args, device)
    prepare(model, args, on_gpu)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=on_gpu)
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq), device=device)
    packed = {}
    if args.packed_docs:
        from bench.train import packed_positions

        packed = {"position_ids": packed_positions(args.seq, args.packed_docs, device)}

    def step():
        model(input_ids=ids, labels=ids, **packed).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # unprofiled: the profiler's own overhead stays out of the step time
    step_ms = statistics.mean(common.step_times(step, args.steps, warmup=3)) * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        common.sync()
        profiled_ms = (time.perf_counter() - start) * 1e3 / args.steps
    events = prof.key_averages()
    families, top, busy = kernel_table(events, args.steps, on_gpu, args.top)
    if args.trace:
        prof.export_chrome_trace(args.trace)
    packing = f", {args.packed_docs} documents a row" if args.packed_docs else ""
    name = f"profile, {args.preset if not args.tiny else 'tiny'} seq {args.seq}{packing}, {args.mode}"
    record = common.envelope(name, "profile", argv, args)
    record.update(
        step_ms=round(step_ms, 2),
        tokens_per_s=round(args.seq / step_ms * 1e3),
        busy_ms_per_step=round(busy, 2),
        busy_share=round(busy / step_ms, 3),
        wall_ms_per_step_profiled=round(profiled_ms, 2),  # as bench.user_paths' Trainer profile measures its steps
        syncs_per_step=syncs_per_step(events, args.steps),
        families=families,
        top_kernels=top,
    )
    common.write_result(args.out, record)
    title = f"{name} on {record['card']}: step {step_ms:.1f} ms, kernels busy {busy:.1f} ms per step"
    figures = [[f["family"], f["ms_per_step"], f"{f['share']:.1%}", f["kernels_per_step"]] for f in families]
    common.print_table(title, ["family", "ms/step", "share", "kernels/step"], figures)
    return record
