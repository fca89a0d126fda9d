"""The paths users run, timed against the reference in the same run on the same card (random weights of a preset, bf16).

    python -m bench user-paths generate --preset 0.5b --batches 1,64 --out bench/results/<card>-user-paths-<date>.json
    python -m bench user-paths sft --preset 0.5b --seq 8192 --out <json>
    python -m bench user-paths dpo --preset 0.5b --seq 2048 --out <json>
    python -m bench user-paths demo --preset 0.5b --out <json>

sft: `align/sft.py` itself (the Trainer, its default path) with a shipped recipe's settings, random weights of the
preset's shape (`--init_preset`), packed 8K rows of synthetic chats, against TRL's SFTTrainer over transformers'
FalconH1ForCausalLM (with mamba-ssm's kernels where installed) on the same data and settings. Real tokens/s: the
micro-batches' tokens (no filler) over the steps after warm-up (compilation, capture), timed as one span with no
host-device sync between steps, so the data loader's time counts and a step's launches overlap the previous step.

dpo: `align/dpo.py` with the preset's full DPO recipe against TRL's DPOTrainer over transformers' model, pairs/s.

generate: `model.generate` as users call it (its default path: static cache, compiled decode step in a CUDA graph),
512-token prompts and 256 new tokens, greedy, against transformers' `generate` on the same weights (fewer new tokens:
it runs ~10 tokens/s). Also the first token where bf16 greedy decoding through the graph leaves the eager path.

demo: the demo's engine streaming one reply from a saved checkpoint of the preset's shape, tokens/s as its pane
shows them.

Each figure is an item of `user_paths` in --out: path, preset, batch (or seq), tokens_per_s, reference_tokens_per_s,
bench_tokens_per_s, card, command, commit. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch
import yaml
from transformers import TrainerCallback

from bench.common import (
    ROOT,
    SpanTimer,
    build,
    cleanup,
    envelope,
    new_parser,
    parse,
    print_table,
    sync,
    write_result,
)
from bench.profile_step import kernel_table, syncs_per_step
from model import preset_config


def timed_generate(model, ids, new, **settings) -> tuple[float, torch.Tensor]:
    """→ (seconds, output) of one greedy `generate` of exactly `new` tokens, after a warm-up call of the same shape
    (the capture and compilation are paid there, as a demo or an evaluation loop pays them once)."""
    if settings:
        model.set_decode(**settings)
    kw = dict(do_sample=False, pad_token_id=0, max_new_tokens=new, min_new_tokens=new)
    with torch.no_grad():
        model.generate(ids, **{**kw, "max_new_tokens": min(new, 16), "min_new_tokens": min(new, 16)})
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, **kw)
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def first_divergence(a: torch.Tensor, b: torch.Tensor, prompt: int) -> int | None:
    """Index of the first generated token where any row of a and b differ, or None."""
    diff = (a[:, prompt:] != b[:, prompt:]).any(0).nonzero()
    return int(diff[0]) if diff.numel() else None


def profile_decode(model, ids, new: int) -> dict:
    """One profiled greedy `generate` of `new` tokens (after the timed runs: graphs captured) → per token: wall ms,
    GPU-busy ms (kernels' own time) and the idle gap between them, with the kernel families. A gap near zero means
    the step is bound by its kernels; a large one, by the host (the generation loop between graph replays)."""
    kw = dict(do_sample=False, pad_token_id=0, max_new_tokens=new, min_new_tokens=new)
    with torch.no_grad():
        model.generate(ids, **kw)  # capture and compile outside the profile
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t) * 1e3 / new
    families, top, busy = kernel_table(prof.key_averages(), new, on_gpu=True, top=12)
    return dict(
        new_tokens=new,
        wall_ms_per_token=round(wall_ms, 3),
        gpu_busy_ms_per_token=round(busy, 3),
        idle_ms_per_token=round(wall_ms - busy, 3),
        families=families,
        top_kernels=top,
    )


class ProfileSteps(TrainerCallback):
    """torch.profiler (host and GPU) over `n` Trainer steps from step `first` → per step: wall ms, the GPU's busy
    ms (kernels' own time) and the idle rest, kernel families, the host's top ops, and the host-device syncs that
    stop the host from running ahead (`.item()`, boolean indexing). The gap between a Trainer step and the bench's
    bare step of the same shape is host work the GPU waits for, or GPU work the bench does not do."""

    def __init__(self, first: int, n: int = 3):
        self.first, self.n, self.result, self._prof, self._t = first, n, None, None, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.first:
            acts = [torch.profiler.ProfilerActivity.CPU]
            acts += [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()
            sync()
            self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._prof is None or state.global_step != self.first + self.n:
            return
        sync()
        wall_ms = (time.perf_counter() - self._t) * 1e3 / self.n
        self._prof.__exit__(None, None, None)
        events = self._prof.key_averages()
        families, top, busy = kernel_table(events, self.n, on_gpu=True, top=12)
        _, host_top, _ = kernel_table(events, self.n, on_gpu=False, top=12)
        syncs = syncs_per_step(events, self.n)
        self.result = dict(
            steps=self.n,
            wall_ms_per_step=round(wall_ms, 2),
            gpu_busy_ms_per_step=round(busy, 2),
            idle_ms_per_step=round(wall_ms - busy, 2),
            syncs_per_step=syncs,
            families=families,
            top_kernels=top,
            top_host_ops=host_top,
        )
        self._prof = None


def bench_generate(args, record):
    cfg = preset_config(args.preset)
    ours = build(cfg, "ours").eval()
    state = {k: v.detach().cpu() for k, v in ours.state_dict().items()}
    rows = []
    for batch in args.batches:
        ids = torch.randint(1, cfg.vocab_size, (batch, args.prompt), device="cuda", generator=torch.Generator("cuda"))
        t0 = time.perf_counter()
        seconds, graph_out = timed_generate(ours, ids, args.new, static_cache=None, graphs=True, compile=True)
        first_call_s = time.perf_counter() - t0 - seconds
        row = record.row("model.generate", batch=batch, tokens_per_s=round(batch * args.new / seconds, 1))
        row["first_call_s"] = round(first_call_s, 1)  # warm-up: prefill, compilation and capture
        if batch == args.batches[0]:
            _, eager_out = timed_generate(ours, ids, args.check_tokens, static_cache=False)
            row["bf16_first_divergence_from_eager"] = first_divergence(
                graph_out[:, : args.prompt + args.check_tokens], eager_out, args.prompt
            )
            ours.set_decode(static_cache=None)
            if args.profile:
                ours.set_decode(static_cache=None, graphs=True, compile=True)
                row["profile"] = profile_decode(ours, ids, min(args.new, 64))
        rows.append(row)
        record.emit(row)
        cleanup()
    del ours
    cleanup()
    if not args.no_reference:
        ref = build(cfg, "reference", state).eval()
        for row in rows:
            ids = torch.randint(1, cfg.vocab_size, (row["batch"], args.prompt), device="cuda")
            seconds, _ = timed_generate(ref, ids, args.reference_new)
            row["reference_tokens_per_s"] = round(row["batch"] * args.reference_new / seconds, 1)
            record.emit(row)
        del ref
        cleanup()
    return rows


def synthetic_chats(path: Path, n: int, seed: int = 0) -> list[str]:
    """n chats of random words (prompts 20–200 words, replies 100–1,500) as a JSONL source → the texts, for the
    tokenizer."""
    import random

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    texts, rows = [], []
    for _ in range(n):
        prompt = " ".join(rng.choices(words, k=rng.randint(20, 200)))
        reply = " ".join(rng.choices(words, k=rng.randint(100, 1500)))
        texts += [prompt, reply]
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return texts


def bench_sft(args, record):
    import tempfile

    from align import sft
    from align.offline.base import build_tokenizer

    work = Path(tempfile.mkdtemp())
    texts = synthetic_chats(work / "chats.jsonl", args.rows)
    build_tokenizer(texts[:4000]).save_pretrained(work / "tok")
    recipe = full_recipe(args.preset, "sft")
    sources = json.dumps([{"path": str(work / "chats.jsonl"), "label": "synthetic", "language": "en"}])
    timer = SpanTimer(args.warmup, args.steps)  # the profiled steps come after the timed span
    profile = ProfileSteps(first=args.steps) if args.profile else None
    sft.main(
        [
            "--config",
            str(recipe),
            "--init_preset",
            args.preset,
            "--sources",
            sources,
            "--output_dir",
            str(work / "ours"),
            *trainer_flags(work, args, extra_steps=profile.n if profile else 0),
            *args.trainer_args,
        ],
        callbacks=[timer] + ([profile] if profile else []),
    )
    ours = timer.tokens_per_s()
    row = record.row("align/sft.py", seq=args.seq, tokens_per_s=ours, recipe=str(recipe.relative_to(recipe.parents[3])))
    if profile:
        row["profile"] = profile.result
    record.emit(row)
    if not args.no_reference:
        record.reference(row, reference_sft, args, work)
    return [row]


def reference_sft(args, work) -> float:
    """TRL's SFTTrainer over transformers' FalconH1ForCausalLM, the recipe's settings, no falcon-align code in the
    training path (the tokenizer and data are the same files)."""
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from align.templates import falcon_h1_chat_template

    cfg = preset_config(args.preset)
    model = build(cfg, "reference", {k: v for k, v in build(cfg, "ours").state_dict().items()})
    tok = AutoTokenizer.from_pretrained(work / "tok")
    tok.chat_template = falcon_h1_chat_template()
    rows = [json.loads(line) for line in (work / "chats.jsonl").read_text().splitlines()]
    data = datasets.Dataset.from_list(rows)
    config = SFTConfig(
        output_dir=str(work / "ref"),
        max_length=args.seq,
        packing=True,
        assistant_only_loss=True,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=4.6e-5,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        logging_steps=5,
        include_num_input_tokens_seen=True,
    )
    timer = SpanTimer(args.warmup, args.steps)
    SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[timer]).train()
    return timer.tokens_per_s()


def trainer_flags(work: Path, args, tokens_seen: bool = True, extra_steps: int = 0) -> list[str]:
    """The flags both training paths add to a shipped recipe: the bench's tokenizer, length, steps, no saving."""
    flags = ["--model_name_or_path", str(work / "tok"), "--max_steps", str(args.steps + extra_steps)]
    flags += ["--max_length", str(args.seq)] if args.seq else []
    flags += ["--gradient_accumulation_steps", "1", "--warmup_steps", "0", "--save_strategy", "no"]
    flags += ["--report_to", "none", "--logging_steps", "5", "--dataloader_num_workers", "0"]
    return flags + (["--include_num_input_tokens_seen", "true"] if tokens_seen else [])


def bench_dpo(args, record):
    """`align/dpo.py` with the 0.5B full DPO recipe's settings (padding-free pairs, precomputed reference
    log-probs, dpo_norm, β 5) on synthetic pairs, against TRL's DPOTrainer over transformers' model with the same
    settings where TRL has them (padded rows: its padding-free mode needs flash-attention). Pairs/s over the
    optimizer steps after warm-up (one span, like sft); `--seq` is max_length."""
    import tempfile

    from align import dpo
    from align.offline.base import build_tokenizer
    from bench.dpo import synthetic_pairs

    profile = ProfileSteps(first=args.steps) if args.profile else None
    extra = profile.n if profile else 0
    work = Path(tempfile.mkdtemp())
    pairs = synthetic_pairs(args.pairs * (args.steps + extra + 1))
    (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    build_tokenizer([p["prompt"] for p in pairs[:200]], vocab_size=600).save_pretrained(work / "tok")
    recipe = full_recipe(args.preset, "dpo")
    sources = json.dumps([{"path": str(work / "pairs.jsonl"), "label": "synthetic", "prompt_column": "prompt"}])
    timer = SpanTimer(args.warmup, args.steps)
    flags = trainer_flags(work, args, tokens_seen=False, extra_steps=extra)
    flags += ["--per_device_train_batch_size", str(args.pairs)]
    flags += ["--init_preset", args.preset, "--sources", sources, "--output_dir", str(work / "ours")]
    dpo.main(["--config", str(recipe), *flags, *args.trainer_args], callbacks=[timer] + ([profile] if profile else []))
    ours = timer.per_s(args.pairs)
    row = record.row(
        "align/dpo.py", seq=args.seq, tokens_per_s=ours, unit="pairs/s", recipe=str(recipe.relative_to(ROOT))
    )
    if profile:
        row["profile"] = profile.result
    record.emit(row)
    if not args.no_reference:
        record.reference(row, reference_dpo, args, work, pairs)
    return [row]


def reference_dpo(args, work, pairs) -> float:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    cfg = preset_config(args.preset, vocab_size=600)
    state = build(cfg, "ours").state_dict()
    model = build(cfg, "reference", state)
    config = DPOConfig(
        output_dir=str(work / "ref"),
        per_device_train_batch_size=args.pairs,
        max_steps=args.steps,
        learning_rate=5e-6,
        bf16=True,
        gradient_checkpointing=False,
        loss_type=["sigmoid_norm"],
        beta=5.0,
        max_length=args.seq,
        precompute_ref_log_probs=True,
        save_strategy="no",
        report_to="none",
        logging_steps=5,
        dataloader_num_workers=0,
    )
    timer = SpanTimer(args.warmup, args.steps)
    tok = AutoTokenizer.from_pretrained(work / "tok")
    DPOTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(pairs), processing_class=tok, callbacks=[timer]
    ).train()
    return timer.per_s(args.pairs)


def bench_demo(args, record):
    """The demo's engine streaming one reply (greedy, `--new` tokens at most) from a saved checkpoint of the preset's
    shape: tokens/s as its pane shows them, after one warm-up reply."""
    import tempfile

    from align.offline.base import build_tokenizer
    from demo.engine import ChatModel, Settings
    from model import FalconH1ForCausalLM

    work = Path(tempfile.mkdtemp())
    texts = synthetic_chats(work / "chats.jsonl", 200)
    tok = build_tokenizer(texts)
    cfg = preset_config(args.preset, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    FalconH1ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(work / "ckpt")
    tok.save_pretrained(work / "ckpt")
    chat = ChatModel(str(work / "ckpt"), chat=True)
    settings = Settings(max_new_tokens=args.new, temperature=0.0)
    prompt = " ".join(texts[0].split()[:300])
    for _ in range(2):  # the first reply pays the compilation and capture
        *_, (_, stats) = chat.stream([], prompt, settings, threading.Event())
    row = record.row("demo", batch=1, tokens_per_s=stats["tokens_per_s"], tokens=stats["tokens"])
    record.emit(row)
    return [row]


class Record:
    """The result being measured: `row` makes an item of `user_paths`, `emit` prints it and rewrites --out with every
    row so far, so a run stopped at its time limit still leaves what it measured (our side before the reference)."""

    def __init__(self, result: dict, args):
        self.result, self.args = result, args
        result["user_paths"] = []

    def row(self, path, **fields) -> dict:
        base = dict(path=path, preset=self.args.preset, reference_tokens_per_s=None, bench_tokens_per_s=None)
        r = self.result
        return {**base, **fields, "card": r["card"], "command": r["command"], "commit": r["commit"]}

    def reference(self, row: dict, measure, *args) -> None:
        """The reference's figure for `row` from `measure(*args)`; a crash or an out-of-memory is recorded in the row
        (`reference_error`) like a figure, and the run goes on."""
        cleanup()
        try:
            row["reference_tokens_per_s"] = measure(*args)
        except Exception as err:  # noqa: BLE001 - the reference's failure is a result
            row["reference_error"] = f"{type(err).__name__}: {err}"[:400]
        cleanup()
        self.emit(row)

    def emit(self, row: dict) -> None:
        rows = self.result["user_paths"]
        if not any(r is row for r in rows):
            rows.append(row)
        print(json.dumps(row), flush=True)
        write_result(self.args.out, self.result)


def parser() -> argparse.ArgumentParser:
    ap = new_parser("user-paths", __doc__, "0.5b")
    ap.add_argument("path", choices=["generate", "sft", "dpo", "demo"])
    ap.add_argument("--batches", default="1,64", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--seq", type=int, default=None, help="max_length (sft: 8192; dpo: the recipe's)")
    ap.add_argument("--steps", type=int, default=20, help="sft: optimizer steps (one micro-batch each)")
    ap.add_argument("--warmup", type=int, default=5, help="sft: steps left out of the timing")
    ap.add_argument("--pairs", type=int, default=8, help="dpo: pairs a step (the recipe's per-device batch)")
    ap.add_argument("--rows", type=int, default=300, help="sft: synthetic chats (~3,400 tokens each)")
    ap.add_argument("--trainer-args", nargs="*", default=[], help="sft: more flags for align/sft.py")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--reference-new", type=int, default=32, help="new tokens for the reference (it is slow)")
    ap.add_argument("--check-tokens", type=int, default=64, help="tokens compared between graph and eager (bf16)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="generate: profile the first batch's decode; sft, dpo: 3 steps more (GPU)",
    )
    return ap


def full_recipe(preset: str, stage: str) -> Path:
    """The shipped full fine-tuning recipe of a preset's stage, whose settings both sides run."""
    return ROOT / "recipes" / f"falcon-h1-{preset}" / stage / "full.yaml"


def default_seq(args) -> int | None:
    """max_length where --seq is not given: 8,192 for sft, the recipe's for dpo (both sides run at it)."""
    if args.path == "sft":
        return 8192
    if args.path == "dpo":
        recipe = full_recipe(args.preset, "dpo")
        return yaml.safe_load(recipe.read_text())["max_length"]
    return None


def main(argv: list[str]) -> dict:
    args = parse(parser(), argv)
    args.seq = args.seq or default_seq(args)
    result = envelope(f"user path {args.path}, {args.preset}", "user-paths", argv, args)

    record = Record(result, args)
    rows = {"generate": bench_generate, "sft": bench_sft, "dpo": bench_dpo, "demo": bench_demo}[args.path](args, record)
    figures = [[r["path"], r.get("batch", r.get("seq")), r["tokens_per_s"], r["reference_tokens_per_s"]] for r in rows]
    print_table(f"user paths, {args.preset}, {result['card']}", ["path", "batch/seq", "tokens/s", "reference"], figures)
    return result
