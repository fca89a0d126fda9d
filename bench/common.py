"""What every benchmark shares: the two models on the same weights, step timing, the result envelope and the table.

A result file is one JSON object: the envelope (name, date, card, command, commit, versions, settings) and the
benchmark's own fields (bench/results/README.md gives each kind's schema).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import platform
import shlex
import statistics
import subprocess
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from transformers import TrainerCallback

from bench import reference_kernels
from model import FalconH1ForCausalLM, preset_config
from model.kernels import get_ops
from model.settings import configure, settings

ROOT = Path(__file__).resolve().parents[1]
# the H100's dense bf16 peak, used for every card so that MFU compares with published figures
PEAK_FLOPS = 989e12


def new_parser(name: str, doc: str | None, preset: str = "0.5b", runtime: bool = True) -> argparse.ArgumentParser:
    """`python -m bench <name>`'s parser: the module's docstring as its help, --preset (the released shape built),
    --out, --commit and, for benchmarks that run falcon-align's model, --runtime."""
    ap = argparse.ArgumentParser(
        prog=f"python -m bench {name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default=preset)
    add_common_arguments(ap, runtime)
    return ap


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The arguments, with --runtime's settings applied (before any model is built)."""
    args = parser.parse_args(argv)
    apply_runtime(args)
    return args


def add_common_arguments(parser: argparse.ArgumentParser, runtime: bool = True) -> None:
    """--out and --commit for every benchmark; --runtime for those that run falcon-align's model."""
    parser.add_argument("--out", default=None, help="write the result (JSON) here")
    parser.add_argument("--commit", default=None, help="the code's commit, where the copy has no git history")
    if runtime:
        parser.add_argument(
            "--runtime",
            default=None,
            type=json.loads,
            help="model.settings fields as JSON, as a recipe's runtime: (e.g. '{\"mixer_streams\": false}')",
        )


def apply_runtime(args: argparse.Namespace) -> None:
    if getattr(args, "runtime", None):
        configure(**args.runtime)


def preset_on_gpu(args: argparse.Namespace):
    """→ (the CUDA kernels, the preset's config with `--layers` applied and room for any length). Loading the
    kernels first also makes mamba-ssm importable for transformers' model (the 2.3.x `__init__` issue)."""
    ops = get_ops("cuda")
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    return ops, preset_config(args.preset, max_position_embeddings=1 << 20, **overrides)


def reference_config(cfg):
    """Our FalconH1Config → transformers' FalconH1Config of the same shape."""
    from transformers import FalconH1Config as HFConfig

    skip = ("architectures", "transformers_version", "model_type")
    return HFConfig(**{k: v for k, v in cfg.to_dict().items() if k not in skip})


def new_model(cfg, which: str):
    """falcon-align's ("ours") or transformers' ("reference") FalconH1ForCausalLM of `cfg`, seeded weights, on the
    current default device and dtype."""
    torch.manual_seed(0)
    if which == "ours":
        return FalconH1ForCausalLM(cfg)
    if which != "reference":
        raise ValueError(f"which must be 'ours' or 'reference', got {which!r}")
    from transformers import FalconH1ForCausalLM as HFModel

    hf_cfg = reference_config(cfg)
    hf_cfg._attn_implementation = "sdpa"
    return HFModel(hf_cfg)


def build(cfg, which: str, state_dict=None, device="cuda", dtype=torch.bfloat16):
    """One side of an ours-against-reference run; the reference takes `state_dict` (ours, same names) strictly."""
    model = new_model(cfg, which)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.to(device, dtype)


def cpu_state(model) -> dict:
    """The weights on the host, for the other side of the run."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cleanup() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0


def step_times(step: Callable[[], object], steps: int, warmup: int = 0, on_warm: Callable | None = None) -> list[float]:
    """Seconds of each of `steps` calls of `step` (each synchronised), after `warmup` untimed calls (compilation,
    capture, autotuning, the allocator) and then `on_warm()` (say, a reset of the peak memory)."""
    for _ in range(warmup):
        step()
    sync()
    if on_warm is not None:
        on_warm()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return times


def graphed(fn, reps=3):
    """fn captured once in a CUDA graph after warm-up on a side stream → replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(reps):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_us(fn, iters):
    """µs per call of `fn` on the current CUDA stream (CUDA events), after 3 untimed calls."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


class SpanTimer(TrainerCallback):
    """A Trainer's optimizer steps `first` to `last - 1` (by `state.global_step` at their start) timed as one span.
    The host waits for the device only at the span's two ends: no sync between steps, so each step's host work (the
    data loader, the launches) overlaps the previous step's device work as in an untimed run, and the data loader's
    time is counted. Tokens: the input tokens seen over the span (with include_num_input_tokens_seen)."""

    def __init__(self, first: int, last: int):
        self.first, self.last = first, last
        self.seconds = self.tokens = None
        self._t = self._seen = 0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.first:
            sync()
            self._t, self._seen = time.perf_counter(), state.num_input_tokens_seen or 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.last:
            sync()
            self.seconds = time.perf_counter() - self._t
            self.tokens = (state.num_input_tokens_seen or 0) - self._seen

    @property
    def steps(self) -> int:
        return self.last - self.first

    def tokens_per_s(self) -> float:
        return round(self.tokens / self.seconds, 1)

    def per_s(self, items_per_step: int) -> float:
        """Items (DPO's pairs, say) a second over the span."""
        return round(items_per_step * self.steps / self.seconds, 2)


class StepTimer(TrainerCallback):
    """A Trainer's optimizer steps: each step's wall time, synchronised at both ends."""

    def __init__(self):
        self.steps, self._t = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        sync()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        self.steps.append(time.perf_counter() - self._t)

    def median_step_s(self, warmup: int) -> float:
        return statistics.median(self.steps[warmup:])


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _package(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def versions() -> dict:
    out = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda)
    for name in ("transformers", "trl", "peft", "triton", "mamba_ssm", "causal_conv1d"):
        out[name] = _package(name)
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        out["driver"] = subprocess.run(query, capture_output=True, text=True).stdout.split("\n")[0].strip() or None
    except OSError:
        out["driver"] = None
    return out


def git_commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or None


def command_line(benchmark: str, argv: list[str], launcher: str = "python") -> str:
    """The command that reproduces the run, without --commit (which names the copy, not the measurement)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--commit":
            skip = True
        elif not arg.startswith("--commit="):
            kept.append(arg)
    return f"{launcher} -m bench {benchmark} " + shlex.join(kept)


def envelope(name: str, benchmark: str, argv: list[str], args: argparse.Namespace, launcher: str = "python") -> dict:
    """The fields every result file opens with."""
    return dict(
        name=name,
        date=datetime.date.today().isoformat(),
        card=card(),
        command=command_line(benchmark, argv, launcher),
        commit=getattr(args, "commit", None) or git_commit(),
        versions=versions(),
        settings=dataclasses.asdict(settings()),
        reference_kernels=reference_kernels.loaded,
    )


def write_result(path: str | None, record: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=2) + "\n")


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    """The short table each benchmark prints last: first column left-aligned, the figures right-aligned."""
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    print(f"\n{title}")
    for row in [header, *cells]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
