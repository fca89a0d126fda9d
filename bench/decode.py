"""Greedy decoding, ours against transformers' `generate` in the same run: same config, same random weights, bf16.

    python -m bench decode --preset 0.5b --compile-decode --out <json>

A 512-token prompt, then 256 new tokens (ours: `model.generate` over the static cache with its decode step in a
CUDA graph, batch 1 and 8; `--compile-decode` also compiled before the capture; the eager path, 64 tokens) and
`--reference-decode-tokens` for transformers (it runs ~15 tokens/s). tokens/s per sequence, after a warm-up call
of the same shape (capture and compilation are paid there).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench import common


def decode_speed(model, batch, prompt=512, new=256, which="ours", graph=True, compile=False):
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device="cuda")
    model.eval()
    try:
        with torch.no_grad():
            kw = dict(do_sample=False, pad_token_id=0)
            if which == "ours":  # model.generate: static cache + CUDA graph, or the eager path
                model.set_decode(static_cache=graph, graphs=graph, compile=compile)
            model.generate(ids, max_new_tokens=16 if graph else 4, min_new_tokens=4, **kw)  # capture + warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
        produced = out.shape[1] - prompt
        return dict(
            decode_tokens_per_s=round(produced / dt, 1),
            batch=batch,
            new_tokens=produced,
            aggregate_tokens_per_s=round(batch * produced / dt, 1),
        )
    except Exception as err:
        return dict(error=repr(err)[:300], batch=batch)
    finally:
        common.cleanup()


def decode_ours(model, args) -> list[dict]:
    runs = [("ours (CUDA graph)", b, {}) for b in (1, 8)]
    if args.compile_decode:
        runs += [("ours (compiled + CUDA graph)", b, dict(compile=True)) for b in (1, 8)]
    runs += [("ours (eager generate)", 1, dict(new=64, graph=False))]
    rows = []
    for which, batch, kw in runs:
        rows.append(dict(which=which, **decode_speed(model, batch, **kw)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def decode_reference(model, args) -> list[dict]:
    speed = decode_speed(model, 1, new=args.reference_decode_tokens, which="reference")
    row = dict(which="transformers generate", **speed)
    print(json.dumps(row), flush=True)
    return [row]


def print_decode(rows: list[dict]) -> None:
    figures = [[r["which"], r["batch"], r.get("decode_tokens_per_s", r.get("error")), r.get("aggregate_tokens_per_s")]
               for r in rows]  # fmt: skip
    common.print_table("decoding, 512-token prompt", ["path", "batch", "tokens/s", "aggregate"], figures)


def parser() -> argparse.ArgumentParser:
    ap = common.new_parser("decode", __doc__, "0.5b")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (quick runs)")
    ap.add_argument("--compile-decode", action="store_true", help="also time the decode step under torch.compile")
    ap.add_argument("--reference-decode-tokens", type=int, default=64)
    ap.add_argument("--no-reference", action="store_true")
    return ap


def main(argv: list[str]) -> dict:
    args = common.parse(parser(), argv)
    ops, cfg = common.preset_on_gpu(args)
    result = common.envelope(f"greedy decoding, {args.preset}", "decode", argv, args)
    result.update(preset=args.preset, kernels=ops.name)
    ours = common.build(cfg, "ours")
    result["params"] = sum(p.numel() for p in ours.parameters())
    state = common.cpu_state(ours)
    rows = decode_ours(ours, args)
    del ours
    common.cleanup()
    if not args.no_reference:
        ref = common.build(cfg, "reference", state)
        rows += decode_reference(ref, args)
        del ref
        common.cleanup()
    result["decode"] = rows
    common.write_result(args.out, result)
    print_decode(rows)
    return result
