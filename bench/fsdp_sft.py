"""SFT through `accelerate launch`: one GPU against FSDP2 on two, the same global batch; their first losses.

    python -m bench fsdp-sft --out <json>

The 0.5B preset (random weights, seed 0, bf16) on recipes/tiny/sft.yaml's data with a tokenizer built from it,
packed 2,048-token rows, 3 steps; one GPU with batch 2 (recipes/accelerate_configs/single_gpu.yaml, only the first
GPU visible: with two, the HF Trainer wraps the model in nn.DataParallel, which TRL's SFTTrainer refuses) against
FSDP2 over 2 processes with batch 1 each (recipes/accelerate_configs/fsdp2.yaml). The reference kernels by default
(`--kernels`): a short run without Triton autotuning; the comparison is about sharding. Both runs' logs land in
--logs.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import common
from model.settings import KERNEL_PROVIDERS

# the Trainer's log lines: a dict per logging step, then the run's summary
LOG_LINE = re.compile(r"\{'(?:loss|train_runtime)'[^{}]*\}")


def trainer_logs(text: str) -> list[dict]:
    """The dicts the Trainer printed, numbers as floats (some versions print them as strings)."""
    return [{k: _float(v) for k, v in ast.literal_eval(match).items()} for match in LOG_LINE.findall(text)]


def _float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def summarise(rc: int, logs: list[dict]) -> dict:
    steps = [row for row in logs if "loss" in row]
    final = next((row for row in logs if "train_loss" in row), {})
    return dict(
        rc=rc,
        losses=[row["loss"] for row in steps],
        grad_norms=[row.get("grad_norm") for row in steps],
        num_tokens=[int(row["num_tokens"]) if "num_tokens" in row else None for row in steps],
        train_loss=final.get("train_loss"),
    )


def make_tokenizer(path: Path) -> None:
    from align.offline.base import build_tokenizer
    from align.offline.tasks import examples, pretraining_documents

    texts = pretraining_documents(1000) + [m["content"] for r in examples("train") for m in r["messages"]]
    build_tokenizer(texts).save_pretrained(path)


def sft_args(args, tok: Path) -> list[str]:
    runtime = json.dumps({"kernels": args.kernels})
    return [
        "align/sft.py", "--config", "recipes/tiny/sft.yaml", "--init_preset", args.preset,
        "--model_name_or_path", str(tok), "--dtype", "bfloat16", "--use_cpu", "False", "--bf16", "True",
        "--max_steps", str(args.steps), "--logging_steps", "1", "--save_strategy", "no",
        "--max_length", str(args.max_length), "--learning_rate", "1e-4", "--report_to", "none",
        "--disable_tqdm", "True", "--seed", "0", "--runtime", runtime,
    ]  # fmt: skip


def launch(config: str, extra: list[str], sft: list[str], log: Path, timeout: int, env: dict) -> tuple[int, str]:
    """One `accelerate launch` of align/sft.py → (exit status, its output, also written to `log`)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, *extra, *sft]
    try:
        done = subprocess.run(command, cwd=common.ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        rc, text = 124, f"{err.stdout or ''}{err.stderr or ''}\ntimed out after {timeout} s"
    log.write_text(text)
    return rc, text


def parser() -> argparse.ArgumentParser:
    ap = common.new_parser("fsdp-sft", __doc__, "0.5b", runtime=False)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--kernels", choices=KERNEL_PROVIDERS, default="reference")
    ap.add_argument("--timeout", type=int, default=300, help="seconds for each of the two runs")
    ap.add_argument("--logs", default=None, help="folder for the two runs' logs (default: a temporary one)")
    return ap


def run_both(args, work: Path, logs: Path) -> dict:
    """The one-GPU run and the FSDP2 run, same global batch (2 rows) → {run: summary}."""
    make_tokenizer(work / "tok")
    sft = sft_args(args, work / "tok")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    fsdp = ["--num_processes", "2", "--fsdp_cpu_ram_efficient_loading", "false"]
    # run: (accelerate config, its launch flags, the per-process batch, more environment)
    runs = {
        "single_gpu": ("single_gpu.yaml", [], "2", {"CUDA_VISIBLE_DEVICES": "0"}),
        "fsdp2_2gpu": ("fsdp2.yaml", fsdp, "1", {}),
    }
    out = {}
    for run, (config, extra, batch, more_env) in runs.items():
        run_sft = [*sft, "--output_dir", str(work / run), "--per_device_train_batch_size", batch]
        config = f"recipes/accelerate_configs/{config}"
        rc, text = launch(config, extra, run_sft, logs / f"{run}.log", args.timeout, {**env, **more_env})
        out[run] = summarise(rc, trainer_logs(text))
        print(run, json.dumps(out[run]), flush=True)
        if rc:  # the failed run's last lines, so that this benchmark's own log says why
            print("\n".join(text.splitlines()[-30:]), flush=True)
    return out


def print_losses(record: dict) -> None:
    one, two = record["single_gpu"], record["fsdp2_2gpu"]
    at = lambda values, i: values[i] if i < len(values) else None  # noqa: E731
    figures = [[i + 1, at(one["losses"], i), at(two["losses"], i), at(one["grad_norms"], i), at(two["grad_norms"], i)]
               for i in range(max(len(one["losses"]), len(two["losses"])))]  # fmt: skip
    header = ["step", "loss, one GPU", "loss, FSDP2 x2", "grad norm, one GPU", "grad norm, FSDP2 x2"]
    common.print_table(f"SFT, {record['setup']['preset']}, {record['card']}", header, figures)


def main(argv: list[str]) -> dict:
    args = parser().parse_args(argv)
    work = Path(tempfile.mkdtemp())
    logs = Path(args.logs) if args.logs else work
    logs.mkdir(parents=True, exist_ok=True)
    record = common.envelope(
        f"FSDP2 on 2 GPUs against one GPU, SFT of the {args.preset} preset", "fsdp-sft", argv, args
    )
    record["card"] = f"2x {record['card']}"
    record["setup"] = {k: v for k, v in vars(args).items() if k not in ("commit", "out", "logs")}
    record.update(run_both(args, work, logs))
    one, two = record["single_gpu"]["losses"], record["fsdp2_2gpu"]["losses"]
    if one and two:
        record["first_loss_relative_difference"] = round(abs(two[0] - one[0]) / abs(one[0]), 4)
    common.write_result(args.out, record)
    print_losses(record)
    return record
