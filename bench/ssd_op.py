"""One layer's SSD scan, forward and backward, on our Triton kernels (model/kernels/ssd.py) against mamba-ssm's,
through the custom ops the model runs (model/kernels/cuda.py), at a preset's layer shapes (CUDA).

    python -m bench ssd-op --preset 0.5b --seqs 2048 8192 32768 --out <json>

x, B, C and the raw dt come in bf16, A, D and dt_bias in fp32, as the mixer passes them (dt discretised by
the scan: softplus(dt + dt_bias)); one row of --seq tokens, packed documents of
--doc-tokens each (0: one document). Each provider's forward and forward + backward are timed on the stream (CUDA
events) and, on CUDA, the forward + backward replayed from a CUDA graph (what training graphs run). `speedup`:
mamba-ssm's time over ours at each length; `agreement`: each provider's y and dx against the first provider's.
`--kernels`: each row also lists its longest kernels in one forward + backward (torch.profiler), what to tune.
`--tune`: a coordinate descent over our kernels' launch options (model/kernels/ssd.py LAUNCH: warps, pipelining
stages) and tile caps (CAPS) at the first --seqs length, each trial the forward + backward timed as the rows are
(in a CUDA graph on a GPU), a choice kept only where y and every gradient agree with the starting settings': the
record's `tune` holds every trial (its time and worst disagreement, or its error) and the best settings.
`--tune rows num_warps:dx` limits the sweep to those knobs.
Rows from 32K tokens on recompute the chunk states in the backward (model/kernels/cuda.py KEEP_STATES_BELOW_TOKENS),
as the model does. `--device cpu` runs the harness: the reference scan, or ours in Triton's interpreter
(TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench import common
from model import preset_config
from model.kernels import REFERENCE

PROVIDERS = ("triton", "mamba-ssm", "reference")


def scan_for(provider: str):
    """The scan of `provider`, with the reference's signature."""
    if provider == "reference":
        return REFERENCE.ssd_scan
    from model.kernels import cuda

    chosen = cuda._ssd_scan_for(provider)
    if chosen is None:
        raise SystemExit(f"ssd-op: the {provider} kernels do not import here")
    return chosen[1]


def make_inputs(cfg, seq: int, args) -> dict:
    """The scan's leaves for one row of `seq` tokens (seeded), and its seq_idx where documents are packed."""
    H, P, G, N = args.heads or cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_n_groups, cfg.mamba_d_state
    gen = torch.Generator().manual_seed(0)
    low = getattr(torch, args.dtype)
    r = lambda *s, dtype=torch.float32: torch.randn(*s, generator=gen).to(args.device, dtype)  # noqa: E731
    A = -torch.rand(H, generator=gen).to(args.device) - 0.5
    # dt raw, as in_proj gives it (bf16), discretised by the scan with the bias and softplus (as the mixer asks)
    a = dict(x=r(1, seq, H, P, dtype=low), dt=r(1, seq, H, dtype=low) - 3.0, A=A, B=r(1, seq, G, N, dtype=low),
             C=r(1, seq, G, N, dtype=low), D=r(H), dt_bias=r(H) * 0.5)  # fmt: skip
    a = {k: v.requires_grad_() for k, v in a.items()}
    seq_idx = None
    if args.doc_tokens:
        seq_idx = (torch.arange(seq, device=args.device) // args.doc_tokens).to(torch.int32)[None]
    return dict(leaves=a, seq_idx=seq_idx, dy=r(1, seq, H, P, dtype=low))


def steps(scan, inputs: dict, chunk: int):
    """→ (forward, forward + backward) closures over one set of inputs."""
    a, seq_idx, dy = inputs["leaves"], inputs["seq_idx"], inputs["dy"]
    leaves = [a[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")]
    options = dict(chunk_size=chunk, seq_idx=seq_idx, dt_softplus=True, return_final_states=True)

    def forward():
        with torch.no_grad():
            return scan(**a, **options)

    def forward_backward():
        y, _ = scan(**a, **options)
        return y.detach(), torch.autograd.grad(y, leaves, dy)

    return forward, forward_backward


def time_us(fn, args) -> float:
    """µs per call: CUDA events on a GPU, the median of synchronised calls elsewhere."""
    if args.device == "cuda":
        return round(common.time_us(fn, args.iters), 1)
    return round(statistics.median(common.step_times(fn, args.iters, warmup=1)) * 1e6, 1)


def measure(provider: str, cfg, seq: int, args) -> tuple[dict, tuple]:
    """One provider at one length → (its row, its y and dx for the agreement)."""
    inputs = make_inputs(cfg, seq, args)
    forward, forward_backward = steps(scan_for(provider), inputs, cfg.mamba_chunk_size)
    y, grads = forward_backward()  # also the warm-up: compiles (mamba-ssm autotunes) before any timing
    common.cleanup()
    row = dict(
        provider=provider,
        seq=seq,
        forward_us=time_us(forward, args),
        forward_backward_us=time_us(forward_backward, args),
    )
    row["peak_gib"] = common.peak_gib()
    if args.kernels:
        row["kernels"] = kernel_times(forward_backward, args)
    if args.device == "cuda" and args.graphs:
        try:
            row["graphed_forward_backward_us"] = round(common.time_us(common.graphed(forward_backward), args.iters), 1)
        except Exception as err:  # a capture failure is a finding too
            row["graphed_forward_backward_us"] = repr(err)[:200]
    return row, (y.float(), grads[0].float())


def kernel_times(fn, args, calls: int = 3, top: int = 12) -> list[dict]:
    """The longest kernels of one call of `fn` under torch.profiler (bench/profile_step.py's table) → [{kernel, us,
    calls}]: on a GPU the kernels' own device time, on CPU the ops' own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    from bench.profile_step import kernel_table

    on_gpu = args.device == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        for _ in range(calls):
            fn()
        common.sync()
    _, longest, _ = kernel_table(prof.key_averages(), calls, on_gpu, top)
    return [dict(kernel=k["kernel"], us=round(k["ms_per_step"] * 1e3, 1), calls=k["calls_per_step"]) for k in longest]


# the knobs `--tune` walks: "<launch option>:<kernel>" for each of ssd.LAUNCH's kernels, and ssd.CAPS's tile caps
LAUNCH_CHOICES = {"num_warps": (2, 4, 8), "num_stages": (1, 2, 3, 4)}
CAP_CHOICES = {"rows": (32, 64, 128), "cols": (16, 32, 64), "dx_cols": (16, 32, 64), "n": (32, 64, 128), "p": (32, 64)}


def tune_knobs(wanted: list[str]) -> list[tuple[str, tuple]]:
    """[(knob, its choices)] in sweep order: the caps, then each kernel's warps and stages; `wanted` names knobs
    (a cap, a launch option for every kernel, or one "option:kernel"); empty: all."""
    from model.kernels import ssd

    knobs = [(cap, CAP_CHOICES[cap]) for cap in ssd.CAPS]
    for kernel, options in ssd.LAUNCH.items():
        knobs += [(f"{option}:{kernel}", LAUNCH_CHOICES[option]) for option in options]
    if not wanted:
        return knobs
    unknown = [w for w in wanted if not any(k == w or k.split(":")[0] == w for k, _ in knobs)]
    if unknown:
        raise SystemExit(f"ssd-op --tune: unknown knob(s) {unknown}; choose from {[k for k, _ in knobs]}")
    return [(k, c) for k, c in knobs if k in wanted or k.split(":")[0] in wanted]


def _setting(knob: str):
    from model.kernels import ssd

    option, _, kernel = knob.partition(":")
    return (ssd.LAUNCH[kernel], option) if kernel else (ssd.CAPS, knob)


def _settings() -> dict:
    from model.kernels import ssd

    return {"launch": {k: dict(v) for k, v in ssd.LAUNCH.items()}, "caps": dict(ssd.CAPS)}


def _restore(settings: dict) -> None:
    from model.kernels import ssd

    ssd.LAUNCH.clear()
    ssd.LAUNCH.update({k: dict(v) for k, v in settings["launch"].items()})
    ssd.CAPS.clear()
    ssd.CAPS.update(settings["caps"])


def _differences(outputs, start) -> dict:
    """y and every gradient of a trial against the starting settings', ‖a − b‖∞ / ‖b‖∞ each."""
    (y, grads), (y0, grads0) = outputs, start
    names = ("y", "dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias")
    pairs = [(y, y0), *zip(grads, grads0)]
    return {name: rel_diff(a.float(), b.float()) for name, (a, b) in zip(names, pairs)}


def tune(cfg, seq: int, args) -> dict:
    """Coordinate descent over the knobs at one length: each knob's other choices timed with the others at their
    best so far. A choice is kept only if it is faster by 2% and computes y and every gradient as the starting
    settings do (within `agree`: another summation order in bf16 rounds differently; a wrong tiling is off by O(1));
    one that does not compile or launch (shared memory, registers) is recorded and skipped. The module's settings are
    restored after; the record says what to put in model/kernels/ssd.py."""
    start = _settings()
    agree = 1e-4 if args.dtype == "float32" else 2e-2
    inputs = make_inputs(cfg, seq, args)
    _, forward_backward = steps(scan_for("triton"), inputs, cfg.mamba_chunk_size)

    def timed() -> float:
        if args.device == "cuda" and args.graphs:
            return round(common.time_us(common.graphed(forward_backward), args.iters), 1)
        return time_us(forward_backward, args)

    reference = forward_backward()
    start_us = best_us = timed()
    trials = []
    try:
        for knob, choices in tune_knobs(args.tune):
            table, key = _setting(knob)
            original = kept = table[key]
            for choice in choices:
                if choice == original:
                    continue
                table[key] = choice
                try:
                    differences = _differences(forward_backward(), reference)  # also compiles what changed
                    trial = dict(knob=knob, value=choice, us=timed(), worst=max(differences.values()))
                except Exception as err:  # noqa: BLE001 - a setting the card cannot run is a result
                    trial = dict(knob=knob, value=choice, error=repr(err)[:160])
                trials.append(trial)
                print(json.dumps(trial), flush=True)
                if "us" in trial and trial["worst"] <= agree and trial["us"] < best_us * 0.98:
                    best_us, kept = trial["us"], choice
                table[key] = kept
        best = _settings()
        against = _differences(forward_backward(), reference)
    finally:
        _restore(start)
    return dict(seq=seq, start=start, start_us=start_us, best=best, best_us=best_us, agree=agree, trials=trials,
                best_against_start=against)  # fmt: skip


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def speedups(rows: list[dict]) -> dict:
    """{seq: mamba-ssm's time over ours} for the forward + backward (graphed where measured)."""
    key = (
        "graphed_forward_backward_us"
        if any(isinstance(r.get("graphed_forward_backward_us"), float) for r in rows)
        else "forward_backward_us"
    )
    by = {(r["provider"], r["seq"]): r.get(key) for r in rows}
    out = {}
    for seq in sorted({r["seq"] for r in rows}):
        ours, theirs = by.get(("triton", seq)), by.get(("mamba-ssm", seq))
        if isinstance(ours, float) and isinstance(theirs, float):
            out[str(seq)] = round(theirs / ours, 2)
    return out


def parser() -> argparse.ArgumentParser:
    ap = common.new_parser("ssd-op", __doc__, "0.5b")
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--providers", nargs="+", choices=PROVIDERS, default=["triton", "mamba-ssm"])
    ap.add_argument("--doc-tokens", type=int, default=0, help="packed documents of this many tokens (0: one)")
    ap.add_argument("--heads", type=int, default=None, help="fewer heads than the preset's (smoke runs)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", help="of x, B, C and the raw dt (A, D, dt_bias stay fp32)")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false", help="skip the CUDA-graph replay")
    ap.add_argument("--kernels", action="store_true", help="each row's longest kernels in one forward + backward")
    ap.add_argument(
        "--tune", nargs="*", default=None, help="sweep our kernels' launch options and tile caps (optionally: knobs)"
    )
    return ap


def main(argv: list[str]) -> dict:
    args = common.parse(parser(), argv)
    cfg = preset_config(args.preset)
    rows, agreement = [], []
    for seq in args.seqs:
        outputs = {}
        for provider in args.providers:
            row, outputs[provider] = measure(provider, cfg, seq, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
        first = args.providers[0]
        for provider in args.providers[1:]:
            (y, dx), (y0, dx0) = outputs[provider], outputs[first]
            agreement.append(dict(seq=seq, provider=provider, against=first, y=rel_diff(y, y0), dx=rel_diff(dx, dx0)))
    shape = dict(H=args.heads or cfg.mamba_n_heads, P=cfg.mamba_d_head, G=cfg.mamba_n_groups, N=cfg.mamba_d_state,
                 chunk=cfg.mamba_chunk_size, dtype=args.dtype, doc_tokens=args.doc_tokens)  # fmt: skip
    record = common.envelope(f"one layer's SSD scan forward + backward, {args.preset}", "ssd-op", argv, args)
    record.update(preset=args.preset, shape=shape, rows=rows, agreement=agreement, speedup=speedups(rows))
    common.write_result(args.out, record)
    if args.tune is not None:  # the rows are written first: a trial that breaks the CUDA context loses only the sweep
        record["tune"] = tune(cfg, args.seqs[0], args)
        common.write_result(args.out, record)
    header = ["provider", "seq", "forward_us", "forward_backward_us", "graphed_forward_backward_us", "peak_gib"]
    common.print_table(f"µs per layer, {record['card']}", header, [[r.get(k) for k in header] for r in rows])
    print(f"speedup (mamba-ssm / ours): {record['speedup']}")
    if args.tune is not None:
        tuned = record["tune"]
        gains = [t for t in tuned["trials"] if t.get("us", float("inf")) < tuned["start_us"]]
        gains.sort(key=lambda t: t["us"])
        title = f"tuning at {tuned['seq']} tokens: {tuned['start_us']} → {tuned['best_us']} µs; the trials faster"
        common.print_table(title, ["knob", "value", "us"], [[t["knob"], t["value"], t["us"]] for t in gains[:12]])
    return record
