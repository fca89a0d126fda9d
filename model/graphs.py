"""CUDA graphs for training: every decoder layer's forward and backward captured once per micro-batch shape.

A Falcon-H1 layer runs ~60 small kernels forward and ~120 backward; at 2K–8K tokens the GPU waits on their
launches, not on arithmetic (`../docs/performance.md`). `enable_training_graphs` captures each layer with
`torch.cuda.make_graphed_callables` for one static shape (batch, seqlen) — packed or not — so a step replays
72 graphs instead of launching ~6,500 kernels. Embedding, loss and optimizer stay eager (a few dozen launches).
Inside the graphs each layer's attention runs on a side stream beside its SSM branch (`mixer_streams`), which
costs nothing to launch there; off with FALCON_ALIGN_MIXER_STREAMS=0 and under torch.distributed.

Static-shape rules: packed rows keep up to `max_docs` documents per micro-batch (`cu_seqlens` is padded with
empty documents to a fixed length; the varlen kernel skips them). A forward whose shape or layout does not
match the captured one, or that uses padding masks, a cache or activation checkpointing, runs eagerly.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn


class _LayerCall(nn.Module):
    """Tensor-only signature around one decoder layer, as make_graphed_callables needs."""

    def __init__(self, layer, ops, max_len):
        super().__init__()
        self.layer, self.ops, self.max_len = layer, ops, max_len

    def forward(self, hidden, cos, sin, seq_idx=None, cu_seqlens=None):
        packed = (cu_seqlens, self.max_len) if cu_seqlens is not None else None
        return self.layer(hidden, cos=cos, sin=sin, seq_idx=seq_idx, packed=packed, ops=self.ops)


class TrainingGraphs:
    def __init__(self, model, batch: int, seqlen: int, max_docs: int | None, compile: bool, mixer_streams: bool):
        from .kernels import get_ops
        from .modeling import inductor_options

        backbone = model.model
        p = next(backbone.parameters())
        cfg = backbone.config
        self.batch, self.seqlen, self.max_docs, self.dtype = batch, seqlen, max_docs, p.dtype
        # unfused projections: replayed graphs launch for free, and there the fused GEMMs' gradient assembly costs
        # more GPU time than they save (H200, 1.5B-Deep at 8K: 28,829 unfused vs 27,322 fused tokens/s)
        # and the attention branch on a side stream, where the SSD scan's kernels leave room (mixer_streams_default)
        ops = replace(get_ops(p.device), fused_projections=False, mixer_streams=mixer_streams)
        self.settings = dict(fused_projections=ops.fused_projections, mixer_streams=ops.mixer_streams, compiled=compile)
        hidden = torch.randn(batch, seqlen, cfg.hidden_size, device=p.device, dtype=p.dtype, requires_grad=True)
        cos = torch.ones(batch, 1, seqlen, cfg.head_dim, device=p.device, dtype=p.dtype)
        sin = torch.zeros_like(cos)
        args = (hidden, cos, sin)
        if max_docs:
            seq_idx = torch.zeros(batch, seqlen, device=p.device, dtype=torch.int32)
            cu = torch.full((max_docs + 1,), batch * seqlen, device=p.device, dtype=torch.int32)
            cu[0] = 0
            args += (seq_idx, cu)
        calls = tuple(_LayerCall(layer, ops, seqlen) for layer in backbone.layers)
        if compile:  # inductor fuses the elementwise glue (norms, RoPE, multipliers, gates) before capture
            calls = tuple(torch.compile(c, dynamic=False, options=inductor_options()) for c in calls)
        # one sample-args tuple per layer; the graphs share one memory pool and replay in this order
        samples = tuple(tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args) for _ in calls)
        self.layers = torch.cuda.make_graphed_callables(calls, samples, num_warmup_iters=3)

    def matches(self, hidden, seq_idx, cu_seqlens) -> bool:
        b, l, _ = hidden.shape
        if (b, l) != (self.batch, self.seqlen) or hidden.dtype != self.dtype or not torch.is_grad_enabled():
            return False
        if seq_idx is None:
            return not self.max_docs
        return bool(self.max_docs) and cu_seqlens.numel() <= self.max_docs + 1

    def run(self, hidden, cos, sin, seq_idx=None, cu_seqlens=None):
        args = (cos, sin)
        if self.max_docs:
            pad = self.max_docs + 1 - cu_seqlens.numel()
            cu = torch.cat([cu_seqlens, cu_seqlens[-1:].expand(pad)]) if pad else cu_seqlens
            args += (seq_idx, cu)
        for layer in self.layers:
            hidden = layer(hidden, *args)
        return hidden


def enable_training_graphs(
    model,
    batch: int,
    seqlen: int,
    max_docs: int | None = None,
    compile: bool = False,
    mixer_streams: bool | None = None,
) -> TrainingGraphs:
    """Capture every layer of `model` (a FalconH1ForCausalLM on CUDA) for micro-batches of (batch, seqlen)
    tokens — rows of up to `max_docs` packed documents when given. mixer_streams: attention on a side stream beside
    the SSM branch (None: `kernels.mixer_streams_default`, on unless FALCON_ALIGN_MIXER_STREAMS=0; never under
    torch.distributed, which must be set up before the capture). Returns the graphs (also kept on the model);
    `disable_training_graphs` drops them."""
    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
        raise RuntimeError("training graphs need the model on a CUDA device")
    if getattr(model.model, "gradient_checkpointing", False) or any(
        getattr(layer, "gradient_checkpointing", False) for layer in model.model.layers
    ):
        raise RuntimeError("training graphs and activation checkpointing do not combine; disable one")
    from .kernels import mixer_streams_default, streams_allowed

    mixer_streams = mixer_streams_default(graphs=True) if mixer_streams is None else mixer_streams and streams_allowed()
    graphs = TrainingGraphs(model, batch, seqlen, max_docs, compile=compile, mixer_streams=mixer_streams)
    model.model._training_graphs = graphs
    return graphs


def disable_training_graphs(model) -> None:
    model.model._training_graphs = None
