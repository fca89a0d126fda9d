"""Ours vs transformers' FalconH1ForCausalLM in the same run: same config, same random weights, bf16.

    python bench/bench.py --preset 0.5b --seqs 2048,8192,32768 --decode --longest \
        --out bench/results/h100-0.5b.json

Training: one micro-batch of `seq` tokens (batch 1, one document), AdamW, forward+backward+step; tokens/s is
the median over timed steps after warm-up; MFU = (6·N·T + 6·L·H·hd·T²) / step time / 989 TFLOP/s (the H100
dense bf16 figure, so numbers compare with published ones). Decode: greedy, 512-token prompt. Prints a table
last and writes every figure to --out.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import FalconH1ForCausalLM, preset_config  # noqa: E402
from model.graphs import disable_training_graphs, enable_training_graphs  # noqa: E402
from model.kernels import get_ops  # noqa: E402

PEAK_FLOPS = 989e12


def step_flops(cfg, n_params, T):
    return 6 * n_params * T + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * T * T


def cleanup():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def time_training(model, T, steps, ckpt=False, packed_docs=0, reset_peak=True, warmup=2, offload=False):
    """→ dict(tokens_per_s, step_s, peak_gib) or dict(error=...). offload: activation offload (implies ckpt)."""
    vocab = model.config.vocab_size
    model.train()
    if offload:
        model.enable_activation_offload()
    elif ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, vocab, (1, T), device="cuda")
    kw = {}
    if packed_docs:
        bounds = torch.linspace(0, T, packed_docs + 1).long().tolist()
        kw["position_ids"] = torch.cat([torch.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])])[None].cuda()

    def step():
        loss = model(input_ids=ids, labels=ids, **kw).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        if reset_peak:  # graphed runs keep the peak of the capture: their activations live in its pool
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        dt = statistics.median(times)
        out = dict(
            tokens_per_s=round(T / dt),
            step_s=round(dt, 4),
            peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        )
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
        cleanup()
    return out


def build(cfg, which, state_dict=None):
    torch.manual_seed(0)
    if which == "ours":
        model = FalconH1ForCausalLM(cfg)
    else:
        from transformers import FalconH1Config as HFConfig
        from transformers import FalconH1ForCausalLM as HFModel

        hf_cfg = HFConfig(
            **{
                k: v
                for k, v in cfg.to_dict().items()
                if k not in ("architectures", "transformers_version", "model_type")
            }
        )
        hf_cfg._attn_implementation = "sdpa"
        model = HFModel(hf_cfg)
        model.load_state_dict(state_dict, strict=True)
    return model.to("cuda", torch.bfloat16)


def time_graphed(model, T, steps, packed_docs=0, compile=False):
    cleanup()
    try:
        graphs = enable_training_graphs(model, 1, T, max_docs=packed_docs or None, compile=compile)
    except Exception as err:
        cleanup()
        return dict(error=f"capture failed: {err!r}"[:300])
    try:
        return dict(**time_training(model, T, steps, packed_docs=packed_docs, reset_peak=False), **graphs.settings)
    finally:
        disable_training_graphs(model)
        cleanup()


def time_compiled(model, T, steps, packed_docs=0):
    """compile_layers without CUDA graphs: what `compile_layers: true` runs in the Trainer (launches stay eager)."""
    cleanup()
    model.compile_layers()
    try:
        return time_training(model, T, steps, packed_docs=packed_docs, warmup=3)
    finally:
        for layer in model.model.layers:  # back to eager for the settings after this one
            layer.compiled = None
        cleanup()


def decode_speed(model, batch, prompt=512, new=256, which="ours", graph=True, compile=False):
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (batch, prompt), device="cuda")
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
        cleanup()


def versions():
    import transformers
    import triton

    out = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        card=torch.cuda.get_device_name(),
    )
    try:
        from importlib.metadata import version

        out["mamba_ssm"] = version("mamba_ssm")
    except Exception:
        out["mamba_ssm"] = None
    try:
        out["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        pass
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="0.5b")
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
    ap.add_argument("--compile-decode", action="store_true", help="also time the decode step under torch.compile")
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--reference-decode-tokens", type=int, default=64)
    ap.add_argument("--longest", action="store_true", help="longest trainable sequence with checkpointing")
    ap.add_argument("--longest-max", type=int, default=524288)
    ap.add_argument("--longest-seqs", default="65536,131072,262144,524288,1048576")
    ap.add_argument("--offload", action="store_true", help="longest runs with activations offloaded to CPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    ops = get_ops("cuda")  # also makes mamba-ssm importable for transformers' model (2.3.x __init__ issue)
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    cfg = preset_config(args.preset, max_position_embeddings=1 << 20, **overrides)
    result = dict(
        name=f"{args.preset}",
        date=datetime.date.today().isoformat(),
        command=" ".join(sys.argv),
        versions=versions(),
        kernels=ops.name,
        training=[],
        decode=[],
        longest=None,
    )
    print(json.dumps(result["versions"]), "kernels:", ops.name, flush=True)

    ours = build(cfg, "ours")
    n_params = sum(p.numel() for p in ours.parameters())
    result["params"] = n_params
    state = {k: v.detach().cpu() for k, v in ours.state_dict().items()}
    rows = []
    for T in map(int, args.seqs.split(",")):
        steps = args.steps if T <= 8192 else max(2, args.steps // 2)
        r = dict(seq=T)
        packed = [dict(packed_docs=args.packed_docs)] if args.packed_docs else []
        # (column, timing function, its keyword arguments)
        settings = [("ours", time_training, {})] + [("ours_packed", time_training, kw) for kw in packed]
        if args.graphs:
            settings += [("ours_graphs", time_graphed, {})] + [
                ("ours_graphs_packed", time_graphed, kw) for kw in packed
            ]
        if args.compile_layers:
            settings += [("ours_compiled", time_compiled, {})]
            settings += [("ours_compiled_packed", time_compiled, kw) for kw in packed]
            settings += [("ours_compiled_graphs", time_graphed, dict(compile=True))]
        if args.settings:
            wanted = args.settings.split(",")
            unknown = set(wanted) - {setting[0] for setting in settings}
            if unknown:
                raise SystemExit(f"--settings: {sorted(unknown)} not among this run's columns (check --graphs etc.)")
            settings = [setting for setting in settings if setting[0] in wanted]
        for key, timed, kw in settings:  # each result printed as it comes: a killed run keeps those before
            r[key] = timed(ours, T, steps, **kw)
            if "tokens_per_s" in r[key] and not kw.get("packed_docs"):  # MFU's FLOPs are one document's
                r[key]["mfu"] = round(step_flops(cfg, n_params, T) / r[key]["step_s"] / PEAK_FLOPS, 4)
            print(json.dumps({"seq": T, key: r[key]}), flush=True)
        rows.append(r)
    if args.longest:
        longest = None
        from model.memory import plan

        for T in (t for t in map(int, args.longest_seqs.split(",")) if t <= args.longest_max):
            r = time_training(ours, T, 1, ckpt=True, warmup=1, offload=args.offload)
            card = torch.cuda.get_device_properties(0).total_memory / 2**30
            r["planned_peak_gib"] = plan(cfg, card_gib=card, offload=args.offload, seq=T).peak_gib_at_seq
            r["offload"] = args.offload
            print(json.dumps(dict(seq=T, ckpt=True, **r)), flush=True)
            if "error" in r:
                break
            longest = dict(seq=T, **r)
        result["longest"] = longest
    if args.decode:
        for b in (1, 8):
            r = dict(which="ours (CUDA graph)", **decode_speed(ours, b))
            print(json.dumps(r), flush=True)
            result["decode"].append(r)
        if args.compile_decode:
            for b in (1, 8):
                r = dict(which="ours (compiled + CUDA graph)", **decode_speed(ours, b, compile=True))
                print(json.dumps(r), flush=True)
                result["decode"].append(r)
        r = dict(which="ours (eager generate)", **decode_speed(ours, 1, new=64, graph=False))
        print(json.dumps(r), flush=True)
        result["decode"].append(r)
    del ours
    cleanup()

    if not args.no_reference:
        ref = build(cfg, "reference", state)
        for r in rows:
            steps = args.steps if r["seq"] <= 8192 else max(2, args.steps // 2)
            r["reference"] = time_training(ref, r["seq"], steps)
            print(json.dumps(dict(seq=r["seq"], reference=r["reference"])), flush=True)
        if args.decode:
            r = dict(
                which="transformers generate",
                **decode_speed(ref, 1, new=args.reference_decode_tokens, which="reference"),
            )
            print(json.dumps(r), flush=True)
            result["decode"].append(r)
        del ref
        cleanup()

    for r in rows:
        o = (
            max(
                r[k].get("tokens_per_s") or 0
                for k in ("ours", "ours_graphs", "ours_compiled", "ours_compiled_graphs")
                if k in r
            )
            or None
        )
        ref = r.get("reference", {}).get("tokens_per_s")
        r["ours_tokens_per_s"], r["reference_tokens_per_s"] = o, ref
        r["speedup"] = round(o / ref, 2) if o and ref else None
    result["training"] = rows
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))

    print(f"\n{result['versions']['card']}  preset {args.preset}  params {n_params / 1e6:.0f}M  kernels {ops.name}")
    cols = ["ours", "ours_packed", "ours_graphs", "ours_graphs_packed", "ours_compiled", "ours_compiled_packed"]
    cols += ["ours_compiled_graphs", "reference"]
    print("tokens/s (peak GiB, MFU); speedup = best of ours / reference")
    for r in rows:
        cells = []
        for c in cols:
            if c in r:
                v = r[c]
                cells.append(
                    f"{c}={v.get('tokens_per_s', str(v.get('error'))[:40])} ({v.get('peak_gib', '-')}, "
                    f"{v.get('mfu', '-')})"
                )
        print(f"seq {r['seq']}: " + "  ".join(cells) + f"  speedup {r['speedup']}")
    if result["longest"]:
        print(f"longest trainable (checkpointing): {result['longest']}")
    for d in result["decode"]:
        print(f"decode {d['which']:>24} batch {d['batch']}: {d.get('decode_tokens_per_s', d.get('error'))} tok/s")


if __name__ == "__main__":
    main()
