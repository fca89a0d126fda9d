"""The paths users run, timed against the reference in the same run on the same card (random weights of a preset, bf16).

    python bench/user_paths.py generate --preset 0.5b --batches 1,64 --out bench/results/<card>-user-paths-<date>.json

generate: `model.generate` as users call it (its default path: static cache, compiled decode step in a CUDA graph),
512-token prompts and 256 new tokens, greedy, against transformers' `generate` on the same weights (fewer new tokens:
it runs ~10 tokens/s). Also the first token where bf16 greedy decoding through the graph leaves the eager path.

Each figure is an item of `user_paths` in --out: path, preset, batch, tokens_per_s, reference_tokens_per_s,
bench_tokens_per_s, card, command, commit. Prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench import build, cleanup, versions  # noqa: E402
from model import preset_config  # noqa: E402


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


def bench_generate(args, item):
    cfg = preset_config(args.preset)
    ours = build(cfg, "ours").eval()
    state = {k: v.detach().cpu() for k, v in ours.state_dict().items()}
    rows = []
    for batch in args.batches:
        ids = torch.randint(1, cfg.vocab_size, (batch, args.prompt), device="cuda", generator=torch.Generator("cuda"))
        t0 = time.perf_counter()
        seconds, graph_out = timed_generate(ours, ids, args.new, static_cache=None, graphs=True, compile=True)
        first_call_s = time.perf_counter() - t0 - seconds
        row = item("model.generate", batch=batch, tokens_per_s=round(batch * args.new / seconds, 1))
        row["first_call_s"] = round(first_call_s, 1)  # warm-up: prefill, compilation and capture
        if batch == args.batches[0]:
            _, eager_out = timed_generate(ours, ids, args.check_tokens, static_cache=False)
            row["bf16_first_divergence_from_eager"] = first_divergence(
                graph_out[:, : args.prompt + args.check_tokens], eager_out, args.prompt
            )
            ours.set_decode(static_cache=None)
        rows.append(row)
        print(json.dumps(row), flush=True)
        cleanup()
    del ours
    cleanup()
    if not args.no_reference:
        ref = build(cfg, "reference", state).eval()
        for row in rows:
            ids = torch.randint(1, cfg.vocab_size, (row["batch"], args.prompt), device="cuda")
            seconds, _ = timed_generate(ref, ids, args.reference_new)
            row["reference_tokens_per_s"] = round(row["batch"] * args.reference_new / seconds, 1)
            print(json.dumps(row), flush=True)
        del ref
        cleanup()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", choices=["generate"])
    ap.add_argument("--preset", default="0.5b")
    ap.add_argument("--batches", default="1,64", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--reference-new", type=int, default=32, help="new tokens for the reference (it is slow)")
    ap.add_argument("--check-tokens", type=int, default=64, help="tokens compared between graph and eager (bf16)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default=None, help="the code's commit, where the copy has no git history")
    args = ap.parse_args()
    env = versions()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    commit = args.commit or git.stdout.strip()
    command = "python bench/user_paths.py " + " ".join(a for a in sys.argv[1:] if not a.startswith("--commit"))

    def item(path, **fields):
        base = dict(path=path, preset=args.preset, reference_tokens_per_s=None, bench_tokens_per_s=None)
        return {**base, **fields, "card": env["card"], "command": command, "commit": commit or None}

    rows = bench_generate(args, item)
    result = dict(date=datetime.date.today().isoformat(), versions=env, user_paths=rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'path':<16}{'batch':>6}{'tokens/s':>12}{'reference':>12}")
    for r in rows:
        print(f"{r['path']:<16}{r['batch']:>6}{r['tokens_per_s']:>12}{r['reference_tokens_per_s'] or '-':>12}")


if __name__ == "__main__":
    main()
