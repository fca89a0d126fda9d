"""Training throughput, ours against transformers' FalconH1ForCausalLM in the same run: same config, same random
weights, bf16.

    python -m bench train --preset 0.5b --seqs 2048,8192,32768 --graphs --compile-layers --out <json>

One micro-batch of `seq` tokens (batch 1, one document; `--packed-docs N` adds rows of N documents), fused AdamW,
forward + backward + step; tokens/s is the median over timed steps after warm-up. MFU = (6·N·T + 6·L·H·hd·T²) /
step time / 989 TFLOP/s (the H100's dense bf16 peak, for every card, so figures compare with published ones).
Columns of ours: eager, `--graphs` (per-layer CUDA graphs), `--compile-layers` (compile_layers, what
`compile_layers: true` runs in the Trainer, and compiled layers inside CUDA graphs); `--settings` keeps some.
`--longest` adds the longest trainable row with checkpointing, `--decode` the decoding figures of
`python -m bench decode`.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench import common
from bench.decode import decode_ours, decode_reference, print_decode
from model.graphs import disable_training_graphs, enable_training_graphs

# ours' columns in table order; the best of the one-document ones is compared with the reference
COLUMNS = ("ours", "ours_packed", "ours_graphs", "ours_graphs_packed", "ours_compiled", "ours_compiled_packed")
COLUMNS += ("ours_compiled_graphs", "ours_compiled_graphs_packed")
ONE_DOCUMENT = ("ours", "ours_graphs", "ours_compiled", "ours_compiled_graphs")


def step_flops(cfg, n_params, T):
    return 6 * n_params * T + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * T * T


def packed_positions(T: int, docs: int, device="cuda") -> torch.Tensor:
    """position_ids (1, T) of `docs` equal documents packed in one row."""
    bounds = torch.linspace(0, T, docs + 1).long().tolist()
    return torch.cat([torch.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])])[None].to(device)


def time_training(model, T, steps, ckpt=False, packed_docs=0, reset_peak=True, warmup=2, offload=False):
    """→ dict(tokens_per_s, step_s, peak_gib) or dict(error=...). offload: activation offload (implies ckpt)."""
    model.train()
    if offload:
        model.enable_activation_offload()
    elif ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (1, T), device="cuda")
    kw = {"position_ids": packed_positions(T, packed_docs)} if packed_docs else {}

    def step():
        model(input_ids=ids, labels=ids, **kw).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # graphed runs keep the peak of the capture: their activations live in its pool
    on_warm = torch.cuda.reset_peak_memory_stats if reset_peak else None
    try:
        dt = statistics.median(common.step_times(step, steps, warmup, on_warm))
        out = dict(tokens_per_s=round(T / dt), step_s=round(dt, 4), peak_gib=common.peak_gib())
    except torch.OutOfMemoryError:
        out = dict(error="out of memory")
    except Exception as err:  # the reference crashes in some settings; record it, keep benchmarking
        out = dict(error=repr(err)[:300])
    finally:
        if offload:
            model.enable_activation_offload(False)
        if ckpt or offload:
            model.gradient_checkpointing_disable()
        opt.state.clear()  # free the AdamW moments before the next setting
        model.zero_grad(set_to_none=True)
        common.cleanup()
    return out


def time_graphed(model, T, steps, packed_docs=0, compile=False):
    common.cleanup()
    try:
        graphs = enable_training_graphs(model, 1, T, max_docs=packed_docs or None, compile=compile)
    except Exception as err:
        common.cleanup()
        return dict(error=f"capture failed: {err!r}"[:300])
    try:
        return dict(**time_training(model, T, steps, packed_docs=packed_docs, reset_peak=False), **graphs.settings)
    finally:
        disable_training_graphs(model)
        common.cleanup()


def time_compiled(model, T, steps, packed_docs=0):
    """compile_layers without CUDA graphs: what `compile_layers: true` runs in the Trainer (launches stay eager)."""
    common.cleanup()
    model.compile_layers()
    try:
        return time_training(model, T, steps, packed_docs=packed_docs, warmup=3)
    finally:
        for layer in model.model.layers:  # back to eager for the settings after this one
            layer.compiled = None
        common.cleanup()


def columns(args) -> list[tuple]:
    """The columns of ours this run times: (name, timing function, its keyword arguments)."""
    packed = [dict(packed_docs=args.packed_docs)] if args.packed_docs else []
    chosen = [("ours", time_training, {})] + [("ours_packed", time_training, kw) for kw in packed]
    if args.graphs:
        chosen += [("ours_graphs", time_graphed, {})] + [("ours_graphs_packed", time_graphed, kw) for kw in packed]
    if args.compile_layers:
        chosen += [("ours_compiled", time_compiled, {})]
        chosen += [("ours_compiled_packed", time_compiled, kw) for kw in packed]
        chosen += [("ours_compiled_graphs", time_graphed, dict(compile=True))]
        # what align/sft.py runs on CUDA by default: packed rows, compiled layers in CUDA graphs
        chosen += [("ours_compiled_graphs_packed", time_graphed, dict(compile=True, **kw)) for kw in packed]
    if args.settings:
        wanted = args.settings.split(",")
        unknown = set(wanted) - {name for name, _, _ in chosen}
        if unknown:
            raise SystemExit(f"--settings: {sorted(unknown)} not among this run's columns (check --graphs etc.)")
        chosen = [column for column in chosen if column[0] in wanted]
    return chosen


def steps_at(args, T: int) -> int:
    return args.steps if T <= 8192 else max(2, args.steps // 2)


def time_ours(model, cfg, args) -> list[dict]:
    """One row per length: every column of ours, with MFU for one-document rows."""
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    for T in map(int, args.seqs.split(",")):
        row = dict(seq=T)
        for name, timed, kw in columns(args):  # each printed as it comes: a killed run keeps those before
            row[name] = timed(model, T, steps_at(args, T), **kw)
            if "tokens_per_s" in row[name] and not kw.get("packed_docs"):  # MFU's FLOPs are one document's
                row[name]["mfu"] = round(step_flops(cfg, n_params, T) / row[name]["step_s"] / common.PEAK_FLOPS, 4)
            print(json.dumps({"seq": T, name: row[name]}), flush=True)
        rows.append(row)
    return rows


def longest(model, cfg, args) -> dict | None:
    """The longest of --longest-seqs (up to --longest-max) that trains with checkpointing, with the planner's
    prediction of its peak."""
    from model.memory import plan

    found = None
    for T in (t for t in map(int, args.longest_seqs.split(",")) if t <= args.longest_max):
        r = time_training(model, T, 1, ckpt=True, warmup=1, offload=args.offload)
        card = torch.cuda.get_device_properties(0).total_memory / 2**30
        r["planned_peak_gib"] = plan(cfg, card_gib=card, offload=args.offload, seq=T).peak_gib_at_seq
        r["offload"] = args.offload
        print(json.dumps(dict(seq=T, ckpt=True, **r)), flush=True)
        if "error" in r:
            break
        found = dict(seq=T, **r)
    return found


def time_reference(model, rows, args) -> None:
    for row in rows:
        row["reference"] = time_training(model, row["seq"], steps_at(args, row["seq"]))
        print(json.dumps(dict(seq=row["seq"], reference=row["reference"])), flush=True)


def compare(rows) -> None:
    """Each row's best one-document column of ours against the reference."""
    for row in rows:
        ours = max((row[k].get("tokens_per_s") or 0 for k in ONE_DOCUMENT if k in row), default=0) or None
        ref = row.get("reference", {}).get("tokens_per_s")
        row["ours_tokens_per_s"], row["reference_tokens_per_s"] = ours, ref
        row["speedup"] = round(ours / ref, 2) if ours and ref else None


def print_tables(result: dict) -> None:
    for row in result["training"]:
        shown = [c for c in (*COLUMNS, "reference") if c in row]
        figures = [
            [c, row[c].get("tokens_per_s", str(row[c].get("error"))[:40]), row[c].get("peak_gib"), row[c].get("mfu")]
            for c in shown
        ]
        title = f"{result['card']}, {result['preset']}, seq {row['seq']}: speedup {common.cell(row['speedup'])}"
        common.print_table(title, ["column", "tokens/s", "peak GiB", "MFU"], figures)
    if result["longest"]:
        header = ["seq", "tokens_per_s", "peak_gib", "planned_peak_gib"]
        common.print_table("longest trainable (checkpointing)", header, [[result["longest"][k] for k in header]])
    if result["decode"]:
        print_decode(result["decode"])


def parser() -> argparse.ArgumentParser:
    ap = common.new_parser("train", __doc__, "0.5b")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (quick runs)")
    ap.add_argument("--seqs", default="2048,8192,32768")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--settings", default=None, help="only these columns of ours, comma-separated (A/B runs)")
    ap.add_argument("--packed-docs", type=int, default=4, help="also time ours on rows of this many documents")
    ap.add_argument("--graphs", action="store_true", help="also time ours with per-layer CUDA graphs")
    ap.add_argument(
        "--compile-layers",
        action="store_true",
        help="also time compile_layers (the Trainer's compile_layers: true; packed too with --packed-docs) and "
        "CUDA graphs of the compiled layers",
    )
    ap.add_argument("--decode", action="store_true", help="also the figures of `python -m bench decode`")
    ap.add_argument("--compile-decode", action="store_true", help="also time the decode step under torch.compile")
    ap.add_argument("--reference-decode-tokens", type=int, default=64)
    ap.add_argument("--longest", action="store_true", help="longest trainable sequence with checkpointing")
    ap.add_argument("--longest-max", type=int, default=524288)
    ap.add_argument("--longest-seqs", default="65536,131072,262144,524288,1048576")
    ap.add_argument("--offload", action="store_true", help="longest runs with activations offloaded to CPU")
    return ap


def main(argv: list[str]) -> dict:
    args = common.parse(parser(), argv)
    ops, cfg = common.preset_on_gpu(args)
    result = common.envelope(f"training throughput, {args.preset}", "train", argv, args)
    result.update(preset=args.preset, kernels=ops.name, training=[], decode=[], longest=None)
    print(json.dumps(result["versions"]), "kernels:", ops.name, flush=True)

    ours = common.build(cfg, "ours")
    result["params"] = sum(p.numel() for p in ours.parameters())
    state = common.cpu_state(ours)
    rows = time_ours(ours, cfg, args)
    if args.longest:
        result["longest"] = longest(ours, cfg, args)
    if args.decode:
        result["decode"] += decode_ours(ours, args)
    del ours
    common.cleanup()

    if not args.no_reference:
        ref = common.build(cfg, "reference", state)
        time_reference(ref, rows, args)
        if args.decode:
            result["decode"] += decode_reference(ref, args)
        del ref
        common.cleanup()

    compare(rows)
    result["training"] = rows
    common.write_result(args.out, result)
    print_tables(result)
    return result
