"""What makes a decoder layer fast on a GPU, apart from its arithmetic (model/modeling.py) and its kernels
(model/kernels): projections of one input fused into one GEMM, the layer's arithmetic compiled once for every layer,
and the two mixers on two CUDA streams. Each is switched by `model.settings` and decided per call by the layer."""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def one_gemm(x, linears: list[nn.Linear]) -> tuple[torch.Tensor, ...] | None:
    """[linear(x) for linear in linears] as one GEMM over their concatenated weights (the input's gradient then
    comes out of one GEMM, not a sum of several). None where that would not be the same function or would bypass
    what runs the module: a module that is not a plain nn.Linear (a PEFT adapter, a quantized layer) or that has
    forward hooks (DeepSpeed ZeRO-3 gathers a module's weights in its pre-hook, accelerate's offload moves them in),
    weights that are not plain Parameters on a device (DTensor shards, tensor subclasses, meta), of mixed dtypes or
    mixed requires_grad, or biases on some but not all."""
    weights = [m.weight for m in linears]
    if any(type(m) is not nn.Linear or m._forward_pre_hooks or m._forward_hooks for m in linears):
        return None
    if any(hasattr(m, "_hf_hook") or type(w) is not nn.Parameter or w.is_meta for m, w in zip(linears, weights)):
        return None
    if len({w.dtype for w in weights}) != 1 or len({w.requires_grad for w in weights}) != 1:
        return None
    biased = {m.bias is not None for m in linears}
    if len(biased) != 1:
        return None
    # without autograd nothing is saved (and dynamo misbinds the Function's varargs under no_grad)
    out = _ConcatLinear.apply(x, *weights) if torch.is_grad_enabled() else F.linear(x, torch.cat(weights))
    if biased.pop():
        out = out + torch.cat([m.bias for m in linears])
    return out.split([w.size(0) for w in weights], dim=-1)


def _tensors(args):
    """The tensors in args: tensors, tuples of them, and the fields of dataclasses (LayerInputs) one level down."""
    for arg in args:
        if dataclasses.is_dataclass(arg):
            yield from _tensors(getattr(arg, f.name) for f in dataclasses.fields(arg))
        elif isinstance(arg, tuple):
            yield from _tensors(arg)
        elif isinstance(arg, torch.Tensor):
            yield arg


class _ConcatLinear(torch.autograd.Function):
    """x @ cat(weights)ᵀ that saves the weights themselves for the backward, not their concatenation: the copy is
    rebuilt there, so fusing holds no extra memory between forward and backward (else a second copy of most of the
    model's weights, ~8 GB for the 7B without activation checkpointing)."""

    @staticmethod
    def forward(ctx, x, *weights):
        ctx.save_for_backward(x, *weights)
        return F.linear(x, torch.cat(weights))  # (..., Σ out_features)

    @staticmethod
    def backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        grad_x = grad @ torch.cat(weights) if ctx.needs_input_grad[0] else None
        grad_w = [None] * len(weights)
        if any(ctx.needs_input_grad[1:]):  # all or none (one_gemm): (Σ out, in) split per weight
            grad_w = (grad.flatten(0, -2).t() @ x.flatten(0, -2)).split([w.size(0) for w in weights])
        return grad_x, *grad_w


# compile_layers: torch.compile(FalconH1DecoderLayer.block) per (backend, dynamic, options), shared by every layer of
# every model (dynamo guards on the layer's structure, not its identity); a layer keeps only those settings, so copies
# of a model (deepcopy, pickling) run their own weights through it
_COMPILED_BLOCKS: dict = {}
# one compiled function serves every layer, so its recompiles (grad on or off, packed or not, batch size, LoRA adapters
# switched off for DPO's reference, a second length) share dynamo's per-function budget: past it, layers silently
# run eagerly. The default (8) is too few for a LoRA DPO loop.
RECOMPILE_LIMIT = 64


def inductor_options() -> dict:
    """Inductor settings for compiled layers: no pointwise cat. A layer's backward assembles the gradient of
    in_proj's output as a cat of [dz, d(x, B, C) back through the conv, ddt]; a pointwise cat evaluates every
    piece under a mask at each output element, about 3× its bytes' time, where a concat kernel lets each piece write
    its own slice (docs/performance.md). Keys this torch's inductor lacks are left out."""
    import torch._inductor.config as config

    return {key: 0 for key in ("max_pointwise_cat_inputs", "max_complex_pointwise_cat_inputs") if hasattr(config, key)}


def compiled_block(block, settings: tuple, device_type: str):
    """settings (backend, dynamic, options) → `block` (FalconH1DecoderLayer.block) compiled, on first use.
    backend None: inductor on CUDA; elsewhere aot_eager (the same graphs, no code generation): CPU training gains
    little from inductor, and torch 2.13's inductor fails on packed rows at the dynamic recompile there (a
    ValueRangeError in the reference scan's chunk-decay matrix; the CUDA path runs the scan as an opaque op)."""
    backend, dynamic, options = settings
    backend = backend or ("inductor" if device_type == "cuda" else "aot_eager")
    key = repr((backend, dynamic, options))
    if key not in _COMPILED_BLOCKS:
        if backend == "inductor" and "mode" not in options:  # torch.compile takes a mode or options, not both
            options = {**options, "options": {**inductor_options(), **options.get("options", {})}}
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _COMPILED_BLOCKS[key] = torch.compile(block, backend=backend, dynamic=dynamic, **options)
    return _COMPILED_BLOCKS[key]


_SIDE_STREAMS: dict = {}  # device → the CUDA stream every layer's attention branch runs on (on_two_streams)


@torch.compiler.disable(recursive=False)
def on_two_streams(ssm, attention: partial, device: torch.device):
    """→ (ssm(), attention()), attention on a side stream while the SSM branch runs on `device`'s current stream.

    The two mixers read the same normed input and meet only in the residual sum, and their kernels leave each other
    room: flash attention is compute-bound, the SSD scan's Triton kernels are short or memory-bound (the gain is in
    docs/performance.md, measured by `python -m bench streams`). The backward follows: autograd runs each op's backward
    on its forward's stream, and makes the gradients that cross streams wait and record their use (its input buffers).

    Memory: the side stream waits for the current one before its branch and the current one for the side before
    the sum, so in the forward a block is reused only by work queued after every use of it. The backward has no such
    joins, so the current stream's tensors that the attention branch reads (the normed input and the LayerInputs'
    RoPE tables, masks, document offsets), which its backward may read on the side stream after their last
    owner lets go, are recorded on the side stream. Captures into CUDA graphs: both streams join the capture through
    the waits. Dynamo runs this frame eagerly (it does not trace streams) and compiles each branch as a graph."""
    main = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.get(main.device)
    if side is None:
        side = _SIDE_STREAMS[main.device] = torch.cuda.Stream(main.device)
    side.wait_stream(main)
    for t in _tensors(attention.args):
        if t.is_cuda:
            t.record_stream(side)
    with torch.cuda.stream(side):
        a = attention()
    m = ssm()
    main.wait_stream(side)
    return m, a
