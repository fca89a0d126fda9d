"""python -m bench <benchmark> [its options]: one entry point for every benchmark (`<benchmark> --help` for each).

A benchmark's module is imported only when it runs, so this listing needs neither torch nor a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name: (module, what it measures); the modules' `main(argv)` parse the rest of the command line
BENCHMARKS = {
    "train": ("bench.train", "training tokens/s and MFU, ours against transformers on the same weights"),
    "decode": ("bench.decode", "greedy decoding tokens/s, ours (static cache, CUDA graph) against transformers"),
    "dpo": ("bench.dpo", "DPO pairs/s, FalconDPOTrainer against TRL's DPOTrainer over transformers"),
    "grpo": ("bench.grpo", "a GRPO step's generation and training, ours against TRL's GRPOTrainer over transformers"),
    "long": ("bench.long_context", "longest trainable row: checkpointing, offload, context parallelism (torchrun)"),
    "profile": ("bench.profile_step", "a training step's GPU time by kernel family (torch.profiler)"),
    "streams": ("bench.stream_probe", "one layer's two mixers on one CUDA stream against two"),
    "ssd-op": ("bench.ssd_op", "one layer's SSD scan forward + backward, our Triton kernels against mamba-ssm's"),
    "user-paths": ("bench.user_paths", "the paths users run: align/sft.py, model.generate, the demo"),
    "fsdp-sft": ("bench.fsdp_sft", "SFT through accelerate: FSDP2 on two GPUs against one GPU, first losses"),
    "gpu-tests": ("bench.gpu_tests", "the GPU test suite → JUnit XML and a summary in bench/results/"),
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="falcon-align's benchmarks. Each writes its result (JSON, schema in bench/results/README.md) "
        "to --out and prints a short table last.",
        epilog="bash bench/run_on_gpu.sh runs them on a GPU machine without network access.",
    )
    sub = ap.add_subparsers(title="benchmarks", dest="benchmark", metavar="<benchmark>")
    for name, (_, summary) in BENCHMARKS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return ap


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        parser().parse_args(argv or ["--help"])  # the listing, or the error naming the unknown benchmark
        return
    if argv[0] != "gpu-tests":  # before any module imports transformers' Falcon-H1: it fixes its kernels then
        importlib.import_module("bench.reference_kernels").load()
    importlib.import_module(BENCHMARKS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    main()
