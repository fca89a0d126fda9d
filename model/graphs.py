"""CUDA graphs for training: every decoder layer's forward and backward captured once per micro-batch shape.

A Falcon-H1 layer runs ~60 small kernels forward and ~120 backward; at 2K–8K tokens the GPU waits on their
launches, not on arithmetic (`../docs/performance.md`). `enable_training_graphs` captures each layer with
`torch.cuda.make_graphed_callables` for one static shape (batch, seqlen) — packed or not — so a step replays
72 graphs instead of launching ~6,500 kernels. Embedding, loss and optimizer stay eager (a few dozen launches).
Inside the graphs each layer's attention runs on a side stream beside its SSM branch (`mixer_streams`), which
costs nothing to launch there; model.settings.mixer_streams switches it, and it is off under torch.distributed.

Static-shape rules: padding-free packed rows (TRL's `packing` and `padding_free`, one row of T tokens) are captured as
one row of a token budget with up to `max_docs` documents of at most `max_doc_len` tokens each. A row of fewer tokens
gets trailing filler documents (zeros, isolated by seq_idx and cu_seqlens like any document, each at most
`max_doc_len` tokens, cut off after the layers), and `cu_seqlens` is padded with empty documents to a fixed length:
the real tokens' outputs and gradients are unchanged. The varlen attention kernel launches a block for every document
slot × every `max_doc_len`/128 query tile, most of which find nothing to do: slots and the length bound sized to the
data (align/fast_path.py) keep that launch small. A forward that does not fit (more tokens or documents, a longer
document, unpacked rows, padding masks, a cache) runs eagerly and is counted by reason in `eager`; `replayed` counts
the others.

Rows whose lengths vary from micro-batch to micro-batch (DPO's pairs) waste the budget's unused tokens: every captured
token is computed. `budgets` captures the layers at several token budgets in one memory pool (`TrainingGraphLadder`),
and each forward replays the smallest that holds it. The rungs share the pool safely because a step replays one rung's
forwards and backwards to the end before another rung runs.

Gradient accumulation: a captured backward hands each parameter's gradient over as a view of a static buffer that the
next replay overwrites, and autograd adopts such a tensor as `.grad` when the parameter has none. The second
micro-batch would then overwrite the first one's gradient and add itself twice. So before a replay, the gradients
adopted since the last one are copied into memory of their own (`AdoptedGrads`), and autograd adds into those. With
one micro-batch a step the optimizer reads the adopted views before any replay, and nothing is copied.
"""

from __future__ import annotations

import torch
from torch import nn


class _LayerCall(nn.Module):
    """Tensor-only signature around one decoder layer, as make_graphed_callables needs."""

    def __init__(self, layer, ops, max_len, streams):
        super().__init__()
        self.layer, self.ops, self.max_len, self.streams = layer, ops, max_len, streams

    def forward(self, hidden, cos, sin, seq_idx=None, cu_seqlens=None):
        from .modeling import LayerInputs

        packed = (cu_seqlens, self.max_len) if cu_seqlens is not None else None
        inputs = LayerInputs(cos, sin, self.ops, seq_idx=seq_idx, packed=packed, streams=self.streams)
        return self.layer(hidden, inputs)


class AdoptedGrads:
    """The layers' trainable parameters, and which of them had no gradient before the last replay: autograd gave those
    the replay's static gradient buffers as `.grad`, which the next replay (of any graph in the pool) overwrites."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params, self.fresh = params, []

    def before_replay(self) -> None:
        """Gradients adopted since the last replay → copies of their own (one buffer per dtype, one foreach copy);
        then note the parameters this replay's backward will give gradients to."""
        adopted = [p for p in self.fresh if p.grad is not None]
        for dtype in {p.dtype for p in adopted}:
            group = [p for p in adopted if p.dtype == dtype]
            flat = torch.empty(sum(p.numel() for p in group), device=group[0].device, dtype=dtype)
            views = [v.view_as(p) for p, v in zip(group, flat.split([p.numel() for p in group]))]
            torch._foreach_copy_(views, [p.grad for p in group])
            for p, view in zip(group, views):
                p.grad = view if p.grad.stride() == view.stride() else p.grad.clone()
        self.fresh = [p for p in self.params if p.grad is None]


class TrainingGraphs:
    """The layers captured for one micro-batch shape, and the counts of forwards replayed and run eagerly. With
    `capture=False` the same layer calls run eagerly behind the same padding and slot rules (tests on any device).
    pool: a CUDA graph memory pool to capture into (`torch.cuda.graph_pool_handle()`), shared with other captures
    that never replay between this one's forward and backward."""

    def __init__(
        self,
        model,
        batch: int,
        seqlen: int,
        max_docs: int | None,
        compile: bool,
        mixer_streams: bool,
        capture=True,
        max_doc_len: int | None = None,
        pool=None,
    ):
        from .acceleration import inductor_options
        from .kernels import get_ops

        backbone = model.model
        p = next(backbone.parameters())
        cfg = backbone.config
        if max_docs and batch != 1:
            raise ValueError("packed rows are captured as one row of the token budget: batch must be 1")
        self.batch, self.seqlen, self.max_docs, self.dtype = batch, seqlen, max_docs, p.dtype
        self.max_doc_len = min(max_doc_len or seqlen, seqlen)  # the varlen kernel's bound on a document's length
        self.replayed, self.eager = 0, {}  # forwards replayed; eager ones by reason
        self.real_tokens = self.captured_tokens = 0  # over the replayed forwards: the rows' tokens, the budget's
        self.grads = AdoptedGrads([p for layer in backbone.layers for p in layer.parameters() if p.requires_grad])
        # unfused projections: replayed graphs launch for free, and there the fused GEMMs' gradient assembly costs
        # more GPU time than they save (docs/performance.md); the attention branch on a side stream, where the SSD
        # scan's kernels leave room
        ops = get_ops(p.device)
        self.settings = dict(kernels=ops.name, fused_projections=False, mixer_streams=mixer_streams, compiled=compile)
        hidden = torch.randn(batch, seqlen, cfg.hidden_size, device=p.device, dtype=p.dtype, requires_grad=True)
        cos = torch.ones(batch, 1, seqlen, cfg.head_dim, device=p.device, dtype=p.dtype)
        sin = torch.zeros_like(cos)
        args = (hidden, cos, sin)
        if max_docs:  # captured on documents within the length bound, as the varlen kernel requires
            pieces, ends = self._pieces(0, p.device, torch.int32)
            if len(ends) > max_docs:
                raise ValueError(
                    f"{max_docs} document slots cannot hold a row of {seqlen} tokens in documents of at most "
                    f"{self.max_doc_len}: at least {len(ends)} are needed"
                )
            seq_idx = pieces[None].expand(batch, seqlen).contiguous()
            cu = torch.full((max_docs + 1,), seqlen, device=p.device, dtype=torch.int32)
            cu[0] = 0
            cu[1 : len(ends) + 1] = torch.tensor(ends, dtype=torch.int32)
            args += (seq_idx, cu)
        calls = tuple(_LayerCall(layer, ops, self.max_doc_len, mixer_streams) for layer in backbone.layers)
        compiled_layers = any(layer.compiled for layer in backbone.layers)  # compile_layers: they compile themselves
        self.settings["compiled"] = compile or compiled_layers
        if compile and not compiled_layers:  # inductor fuses the elementwise glue (norms, RoPE, multipliers, gates)
            calls = tuple(torch.compile(c, dynamic=False, options=inductor_options()) for c in calls)
        # one sample-args tuple per layer; the graphs share one memory pool and replay in this order
        samples = tuple(tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args) for _ in calls)
        if capture:
            self.layers = torch.cuda.make_graphed_callables(calls, samples, num_warmup_iters=3, pool=pool)
        else:
            self.layers = calls

    def _pieces(self, start: int, device, dtype) -> tuple[torch.Tensor, list[int]]:
        """Tokens start..seqlen cut into documents of at most `max_doc_len` → each token's document, counted from 0
        (seqlen - start,), and the documents' ends (cu_seqlens entries)."""
        pieces = torch.arange(self.seqlen - start, device=device, dtype=dtype) // self.max_doc_len
        return pieces, list(range(start + self.max_doc_len, self.seqlen, self.max_doc_len)) + [self.seqlen]

    def fillers(self, tokens: int) -> int:
        """How many filler documents pad a packed row of `tokens` real tokens to the budget."""
        return -(-(self.seqlen - tokens) // self.max_doc_len)

    def misfit(self, hidden, seq_idx, cu_seqlens, longest: int | None = None) -> str | None:
        """Why a training forward cannot replay the graphs, or None. A packed row (1, T) fits when its tokens, its
        documents and its longest document (`longest`, tokens) fit the budget (`__call__` pads it); unpacked batches
        must have the captured shape."""
        b, l, _ = hidden.shape
        if hidden.dtype != self.dtype:
            return f"dtype {hidden.dtype} (captured {self.dtype})"
        if seq_idx is None and self.max_docs:
            return "unpacked rows (captured packed)"
        if seq_idx is None:
            return None if (b, l) == (self.batch, self.seqlen) else f"shape ({b}, {l})"
        if not self.max_docs:
            return "packed rows (captured unpacked)"
        if b != 1 or l > self.seqlen:
            return f"({b}, {l}) tokens over the budget of one row of {self.seqlen}"
        if longest is not None and longest > self.max_doc_len:
            return f"a document of {longest} tokens over the bound of {self.max_doc_len}"
        docs = cu_seqlens.numel() - 1 + self.fillers(l)  # the fillers take slots
        return None if docs <= self.max_docs else f"{docs} documents over {self.max_docs} slots"

    def __call__(self, hidden, cos, sin, seq_idx=None, cu_seqlens=None, eager_reason=None, longest=None):
        """→ the layers' output, replayed, or None (the caller then runs eagerly); counted either way. A packed row of
        fewer tokens than the budget gets trailing filler documents of zeros, isolated by seq_idx and cu_seqlens like
        any other document, and cut off again: the real tokens' outputs and every gradient are the unpadded row's.
        longest: the row's longest document (tokens), checked against the captured bound."""
        why = eager_reason or self.misfit(hidden, seq_idx, cu_seqlens, longest)
        if why:
            self.eager[why] = self.eager.get(why, 0) + 1
            return None
        self.replayed += 1
        real = hidden.size(1)
        self.real_tokens += self.batch * real
        self.captured_tokens += self.batch * self.seqlen
        self.grads.before_replay()
        args = (cos, sin)
        if self.max_docs:
            hidden, cos, sin, seq_idx, cu_seqlens = self._fill(hidden, cos, sin, seq_idx, cu_seqlens)
            pad = self.max_docs + 1 - cu_seqlens.numel()
            cu = torch.cat([cu_seqlens, cu_seqlens[-1:].expand(pad)]) if pad else cu_seqlens  # empty documents
            args = (cos, sin, seq_idx, cu)
        for layer in self.layers:
            hidden = layer(hidden, *args)
        return hidden[:, :real]

    def _fill(self, hidden, cos, sin, seq_idx, cu_seqlens):
        """A packed row (1, T): hidden (1, T, d), cos/sin (1, 1, T, hd), seq_idx (1, T) → the same at the budget's
        length, the filler documents (zeros, RoPE position 0, `max_doc_len` tokens each but the last) after the real
        ones."""
        real = hidden.size(1)
        extra = self.seqlen - real
        if not extra:
            return hidden, cos, sin, seq_idx, cu_seqlens
        hidden = torch.cat([hidden, hidden.new_zeros(1, extra, hidden.size(-1))], 1)
        cos = torch.cat([cos, cos.new_ones(1, 1, extra, cos.size(-1))], 2)
        sin = torch.cat([sin, sin.new_zeros(1, 1, extra, sin.size(-1))], 2)
        pieces, _ = self._pieces(real, seq_idx.device, seq_idx.dtype)
        seq_idx = torch.cat([seq_idx, seq_idx[:, -1:] + 1 + pieces[None]], 1)
        # the fillers' ends made on the device: a tensor from a host list is a blocking copy, which waits for the GPU
        ends = torch.arange(self.fillers(real), device=cu_seqlens.device, dtype=cu_seqlens.dtype) * self.max_doc_len
        ends = (ends + real + self.max_doc_len).clamp(max=self.seqlen)
        cu_seqlens = torch.cat([cu_seqlens, ends])
        return hidden, cos, sin, seq_idx, cu_seqlens


class TrainingGraphLadder:
    """Packed rows captured at several token budgets ("rungs", ascending) in one memory pool: each forward replays the
    smallest rung it fits, and runs eagerly (counted) only where the largest does not hold it. Same counts and call as
    `TrainingGraphs`; `replayed_at` counts the forwards each budget served."""

    def __init__(self, rungs: list[TrainingGraphs]):
        self.rungs = sorted(rungs, key=lambda g: g.seqlen)
        for rung in self.rungs[1:]:  # one account of adopted gradients: every rung's replay overwrites the pool
            rung.grads = self.rungs[0].grads
        self.eager: dict[str, int] = {}
        self.settings = {**self.rungs[0].settings, "budgets": [g.seqlen for g in self.rungs]}

    @property
    def replayed(self) -> int:
        return sum(g.replayed for g in self.rungs)

    @property
    def replayed_at(self) -> dict[int, int]:
        return {g.seqlen: g.replayed for g in self.rungs}

    @property
    def real_tokens(self) -> int:
        return sum(g.real_tokens for g in self.rungs)

    @property
    def captured_tokens(self) -> int:
        return sum(g.captured_tokens for g in self.rungs)

    def __call__(self, hidden, cos, sin, seq_idx=None, cu_seqlens=None, eager_reason=None, longest=None):
        why = eager_reason
        if not why:
            rung = next((g for g in self.rungs if g.misfit(hidden, seq_idx, cu_seqlens, longest) is None), None)
            if rung is not None:
                return rung(hidden, cos, sin, seq_idx, cu_seqlens, longest=longest)
            why = self.rungs[-1].misfit(hidden, seq_idx, cu_seqlens, longest)
        self.eager[why] = self.eager.get(why, 0) + 1
        return None


def enable_training_graphs(
    model,
    batch: int,
    seqlen: int,
    max_docs: int | None = None,
    compile: bool = False,
    mixer_streams: bool | None = None,
    max_doc_len: int | None = None,
    budgets: list[int] | None = None,
) -> TrainingGraphs | TrainingGraphLadder:
    """Capture every layer of `model` (a FalconH1ForCausalLM on CUDA) for micro-batches of (batch, seqlen)
    tokens — one padding-free row of up to `max_docs` packed documents of at most `max_doc_len` tokens (default:
    seqlen) when given. budgets: smaller token budgets for packed rows, captured beside `seqlen` in the same memory
    pool (→ a `TrainingGraphLadder`); each holds as many real documents as the full budget, plus its own fillers.
    mixer_streams: attention on a side
    stream beside the SSM branch (None: model.settings.mixer_streams, whose default is on in graphs; never under
    torch.distributed, which must be set up before the capture). Returns the graphs (also set on the model);
    `disable_training_graphs` drops them."""
    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
        raise RuntimeError("training graphs need the model on a CUDA device")
    if getattr(model.model, "gradient_checkpointing", False) or any(
        getattr(layer, "gradient_checkpointing", False) for layer in model.model.layers
    ):
        raise RuntimeError("training graphs and activation checkpointing do not combine; disable one")
    from .kernels import mixer_streams_wanted, streams_allowed

    streams = mixer_streams_wanted(in_graphs=True) if mixer_streams is None else mixer_streams and streams_allowed()
    budgets = sorted({b for b in budgets or () if b < seqlen})
    if budgets and not max_docs:
        raise ValueError("several token budgets are captured for packed rows only (max_docs)")
    pool = torch.cuda.graph_pool_handle() if budgets else None
    kw = dict(compile=compile, mixer_streams=streams, max_doc_len=max_doc_len, pool=pool)
    graphs = TrainingGraphs(model, batch, seqlen, max_docs, **kw)
    if budgets:
        real_docs = max_docs - graphs.fillers(0)  # slots for real documents, the same in every rung

        def slots(tokens):  # and the most fillers a row of `tokens` can take
            return real_docs + -(-tokens // min(max_doc_len or tokens, tokens))

        graphs = TrainingGraphLadder([TrainingGraphs(model, batch, b, slots(b), **kw) for b in budgets] + [graphs])
    model.model.set_training_graphs(graphs)
    return graphs


def disable_training_graphs(model) -> None:
    model.model.set_training_graphs(None)
