"""Can a layer's two mixers share the GPU? Attention and the Mamba-2 branch, forward + backward, one after the
other on one stream against side by side on two streams, at one preset's layer shapes (CUDA only).

    python -m bench streams --preset 1.5b-deep --seq 8192 --out <json>

Falcon-H1 runs attention and the SSM on the same normed input and adds both: nothing orders them. Attention is
compute-bound (flash tiles); the SSD scan is 15 Triton kernels of short or memory-bound grids. `mixers` times
the two ops alone, `branches` each with its projections (q/k/v + o_proj; in_proj + out_proj). Each variant is
captured in a CUDA graph (what the training graphs replay) and replayed; prints µs per layer and the saving.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench import common
from model import preset_config
from model.kernels import get_ops


def make_branches(cfg, seq, with_projections):
    """→ (attention step, ssm step): each runs its branch forward and backward on the current stream."""
    dev, bf16 = "cuda", torch.bfloat16
    d, H, KV, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    mh, P, G, N = cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_n_groups, cfg.mamba_d_state
    scan = get_ops(dev).ssd_scan
    rand = lambda *s, dtype=bf16: torch.randn(*s, device=dev, dtype=dtype)  # noqa: E731
    u = rand(1, seq, d).requires_grad_()
    w_qkv, w_o = rand((H + 2 * KV) * hd, d) * d**-0.5, rand(d, H * hd) * (H * hd) ** -0.5
    w_in, w_out = rand(cfg.in_proj_dim, d) * d**-0.5, rand(d, cfg.d_ssm) * cfg.d_ssm**-0.5
    for w in (w_qkv, w_o, w_in, w_out):
        w.requires_grad_()
    q0, k0, v0 = rand(1, H, seq, hd), rand(1, KV, seq, hd), rand(1, KV, seq, hd)
    x0, B0, C0 = rand(1, seq, mh, P), rand(1, seq, G, N), rand(1, seq, G, N)
    dt0 = torch.rand(1, seq, mh, device=dev) * 0.1
    for t in (q0, k0, v0, x0, B0, C0, dt0):
        t.requires_grad_()
    A = -torch.rand(mh, device=dev) - 0.5
    D = torch.ones(mh, device=dev, requires_grad=True)
    g_out = rand(1, seq, d)

    def attention():
        if with_projections:
            q, k, v = F.linear(u, w_qkv).split([H * hd, KV * hd, KV * hd], dim=-1)
            q, k, v = (t.view(1, seq, -1, hd).transpose(1, 2) for t in (q, k, v))
            leaves = (u, w_qkv, w_o)
        else:
            q, k, v, leaves = q0, k0, v0, (q0, k0, v0)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=KV != H)
        o = o.transpose(1, 2).reshape(1, seq, H * hd)
        out, grad = (F.linear(o, w_o), g_out) if with_projections else (o, torch.ones_like(o))
        torch.autograd.grad(out, leaves, grad)

    def ssm():
        if with_projections:
            z, x, B, C, dt = F.linear(u, w_in).split([cfg.d_ssm, cfg.d_ssm, G * N, G * N, mh], dim=-1)
            x, B, C = x.reshape(1, seq, mh, P), B.reshape(1, seq, G, N), C.reshape(1, seq, G, N)
            dt, leaves = F.softplus(dt.float()), (u, w_in, w_out, D)
        else:
            z, x, B, C, dt, leaves = None, x0, B0, C0, dt0, (x0, B0, C0, dt0, D)
        y = scan(x, dt, A, B, C, cfg.mamba_chunk_size, D=D).reshape(1, seq, cfg.d_ssm)
        out, grad = (F.linear(y * F.silu(z), w_out), g_out) if with_projections else (y, torch.ones_like(y))
        torch.autograd.grad(out, leaves, grad)

    return attention, ssm


def variants(attention, ssm):
    side = torch.cuda.Stream()

    def sequential():
        attention()
        ssm()

    def parallel():  # fork: attention on the side stream; join before the sum
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            attention()
        ssm()
        main.wait_stream(side)

    return dict(attention=attention, ssm=ssm, sequential=sequential, two_streams=parallel)


def probe(cfg, args, name: str, projections: bool) -> dict:
    """µs per layer of each variant, captured and replayed; the saving of two streams over one."""
    attention, ssm = make_branches(cfg, args.seq, projections)
    us = {}
    for label, fn in variants(attention, ssm).items():
        try:
            us[label] = round(common.time_us(common.graphed(fn), args.iters), 1)
        except Exception as err:  # a capture failure is a finding too
            us[label] = repr(err)[:200]
    if all(isinstance(v, float) for v in us.values()):
        us["saving_us"] = round(us["sequential"] - us["two_streams"], 1)
        us["saving_share"] = round(us["saving_us"] / us["sequential"], 3)
    return dict(variant=name, preset=args.preset, seq=args.seq, **us)


def parser() -> argparse.ArgumentParser:
    ap = common.new_parser("streams", __doc__, "1.5b-deep")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=50)
    return ap


def main(argv: list[str]) -> dict:
    args = common.parse(parser(), argv)
    cfg = preset_config(args.preset)
    rows = []
    for name, projections in (("mixers", False), ("branches", True)):
        rows.append(probe(cfg, args, name, projections))
        print(json.dumps(rows[-1]), flush=True)
    record = common.envelope(f"one layer's mixers on one or two streams, {args.preset} seq {args.seq}", "streams",
                             argv, args)  # fmt: skip
    record.update(kernels=get_ops("cuda").name, rows=rows)
    common.write_result(args.out, record)
    header = ["variant", "attention", "ssm", "sequential", "two_streams", "saving_share"]
    common.print_table(f"µs per layer, {record['card']}", header, [[r.get(k) for k in header] for r in rows])
    return record
