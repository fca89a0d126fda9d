"""Falcon-H1: parallel hybrid blocks (GQA attention ‖ Mamba-2 on one normed input) + SwiGLU, with µP multipliers.

Parameter names are transformers' own (`model.layers.{i}.mamba.in_proj`, `self_attn.q_proj`,
`feed_forward.down_proj`, `final_layernorm`, ...), so released checkpoints load strictly and PEFT targets
match. Kernels come from `model.kernels.get_ops` only; this file never probes for packages.

Per layer (spec §3.2):
    h = input_layernorm(x)
    x = x + mamba(h) · ssm_out + self_attn(h · attn_in) · attn_out
    x = x + feed_forward(pre_ff_layernorm(x))
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache import FalconH1HybridCache
from .checks import check_input_ids
from .config import FalconH1Config
from .kernels import get_ops
from .kernels.ref import rmsnorm_gated_ref, rmsnorm_ref
from .loss import chunked_causal_lm_loss
from .packing import (
    build_attention_mask,
    cu_seqlens_from_seq_idx,
    positions_from_attention_mask,
    resolve_seq_idx,
)

# long rows under activation checkpointing: the MLP runs in token chunks of this size, each checkpointed on its own
# (FalconH1Model.mlp_chunk_tokens), so a layer's recompute holds one chunk's (chunk, 2·intermediate) activations
MLP_CHUNK_TOKENS = 16384
# longer rows run the SSD scan in segments of this many tokens with exact state passing (FalconH1Mixer._scan)
SCAN_SEGMENT_TOKENS = 32768

# transformers ≥ 5.24 names the output field `cache`; earlier releases `past_key_values`
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class FalconH1RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        return rmsnorm_ref(x, self.weight, self.variance_epsilon)


class FalconH1RMSNormGated(nn.Module):
    """Holds `mamba.norm.weight`; the math lives in the kernels (group-wise over d_ssm / n_groups)."""

    def __init__(self, hidden_size: int, eps: float, n_groups: int, norm_before_gate: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.group_size = hidden_size // n_groups
        self.norm_before_gate = norm_before_gate

    def forward(self, y, z, ops):
        # under torch.compile the reference: inductor fuses it with the gate and the casts around it (forward and
        # backward), where mamba-ssm's Triton norm is an autograd.Function that torch.compile cannot trace
        norm = rmsnorm_gated_ref if torch.compiler.is_compiling() else ops.rmsnorm_gated
        return norm(y, z, self.weight, self.variance_epsilon, self.group_size, self.norm_before_gate)


def _rope_cos_sin(position_ids, head_dim, theta, dtype):
    """position_ids (b, l) → cos, sin (b, 1, l, head_dim) NeoX layout; frequencies in fp32 as HF does."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim)
    )
    freqs = position_ids[..., None].float() * inv_freq  # (b, l, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class FalconH1Attention(nn.Module):
    def __init__(self, config: FalconH1Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.key_multiplier = config.key_multiplier
        self.dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, u, cos, sin, mask, cache, ops, packed=None, cp=None, qkv=None):
        """mask: boolean (b, 1, l, past+l) or None (plain causal); packed: (cu_seqlens, max_len) for
        documents packed in the rows, attended to one by one through varlen attention; cp: this rank's
        context-parallel step (model/context_parallel.py); qkv: the projections of u already made (the layer's
        fused input GEMM), u then unused."""
        q, k, v = qkv if qkv is not None else (self.q_proj(u), self.k_proj(u), self.v_proj(u))
        b, l, _ = q.shape
        q = q.view(b, l, self.n_heads, self.head_dim).transpose(1, 2)  # (b, H, l, hd)
        k = k.view(b, l, self.n_kv, self.head_dim).transpose(1, 2) * self.key_multiplier
        v = v.view(b, l, self.n_kv, self.head_dim).transpose(1, 2)  # (b, kv, l, hd)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin  # keys are cached scaled and rotated
        if cp is not None:
            o = cp.attend(q, k, v, self.head_dim**-0.5, gqa=self.n_kv != self.n_heads)  # (1, H, n, hd)
            return self.o_proj(o.transpose(1, 2).reshape(b, l, self.n_heads * self.head_dim))
        if packed is not None:
            cu_seqlens, max_len = packed
            flat = [t.transpose(1, 2).reshape(b * l, -1, self.head_dim) for t in (q, k, v)]  # (b·l, heads, hd)
            o = ops.varlen_attention(*flat, cu_seqlens, max_len, self.head_dim**-0.5)
            return self.o_proj(o.reshape(b, l, self.n_heads * self.head_dim))
        if cache is not None:
            k, v = cache.update_kv(self.layer_idx, k, v)
        # without a cache, keys are the queries' own positions: plain causal (no test on a length, which under
        # torch.compile with symbolic lengths would break the graph)
        causal = mask is None and (cache is None or (k.size(2) == l and l > 1))
        o = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            scale=self.head_dim**-0.5,
            enable_gqa=self.n_kv != self.n_heads,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.o_proj(o.transpose(1, 2).reshape(b, l, self.n_heads * self.head_dim))


class FalconH1Mixer(nn.Module):
    """Mamba-2 mixer. in_proj output order: [z, x, B, C, dt]; the conv runs over [x, B, C]."""

    def __init__(self, config: FalconH1Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.d_ssm = config.d_ssm
        self.n_heads = config.mamba_n_heads
        self.head_dim = config.mamba_d_head
        self.n_groups = config.mamba_n_groups
        self.d_state = config.mamba_d_state
        self.conv_dim = config.conv_dim
        self.chunk_size = config.mamba_chunk_size
        self.time_step_limit = tuple(config.time_step_limit or (0.0, float("inf")))
        self.ssm_in_multiplier = config.ssm_in_multiplier
        self.in_proj = nn.Linear(config.hidden_size, config.in_proj_dim, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            config.mamba_d_conv,
            groups=self.conv_dim,
            padding=config.mamba_d_conv - 1,
            bias=config.mamba_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.ones(self.n_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.n_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = (
            FalconH1RMSNormGated(self.d_ssm, config.rms_norm_eps, self.n_groups, config.mamba_norm_before_gate)
            if config.mamba_rms_norm
            else None
        )
        self.out_proj = nn.Linear(self.d_ssm, config.hidden_size, bias=config.projectors_bias)
        self.register_buffer("mup_vector", mup_vector(config), persistent=False)

    def forward(self, h, ops, seq_idx=None, pad_mask=None, cache=None, cp=None, zxbcdt=None):
        """zxbcdt: in_proj's output with its multipliers, already made (the layer's fused input GEMM)."""
        b, l, _ = h.shape
        H, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.d_state
        if zxbcdt is None:
            zxbcdt = self.in_proj(h * self.ssm_in_multiplier) * self.mup_vector
        z, xBC, dt = zxbcdt.split([self.d_ssm, self.conv_dim, H], dim=-1)
        if pad_mask is not None:  # pads enter the conv as zeros, exactly like positions before the start
            xBC = xBC * pad_mask[..., None]
        A = -torch.exp(self.A_log.float())
        conv_w = self.conv1d.weight.squeeze(1)  # (conv_dim, K)
        continuing = cache is not None and cache.has_state(self.layer_idx)

        if continuing and l == 1:  # decode: one recurrence step on the cached states
            xBC = ops.causal_conv1d_update(
                xBC[:, 0], cache.conv_states[self.layer_idx], conv_w, self.conv1d.bias, activation="silu"
            )
            x, B, C = xBC.split([self.d_ssm, G * N, G * N], dim=-1)
            y = ops.selective_state_update(
                cache.ssm_states[self.layer_idx],
                x.view(b, H, P),
                dt[:, 0],
                A,
                B.view(b, G, N),
                C.view(b, G, N),
                D=self.D,
                dt_bias=self.dt_bias,
                dt_softplus=True,
                dt_limit=self.time_step_limit,
            ).view(b, 1, self.d_ssm)
        else:
            conv_init = cache.conv_states[self.layer_idx] if continuing else None
            ssm_init = cache.ssm_states[self.layer_idx] if continuing else None
            if cp is not None:  # each chunk's window continues over the K-1 positions before it in the row
                xBC, conv_final = cp.conv(ops, xBC, conv_w, self.conv1d.bias), None
            else:
                conv = ops.causal_conv1d(
                    xBC.transpose(1, 2),
                    conv_w,
                    self.conv1d.bias,
                    seq_idx=seq_idx,
                    initial_states=conv_init,
                    return_final_states=cache is not None,  # training: no state, so the fast kernel can run
                    activation="silu",
                )
                xBC, conv_final = conv if cache is not None else (conv, None)
                xBC = xBC.transpose(1, 2)  # (b, l, conv_dim)
            dt = F.softplus(dt.float() + self.dt_bias.float())  # (b, l, H) fp32
            if self.time_step_limit != (0.0, float("inf")):
                dt = dt.clamp(*self.time_step_limit)
            if pad_mask is not None:  # a pad neither feeds nor decays the state: dt = 0, x = 0
                xBC = xBC * pad_mask[..., None]
                dt = dt * pad_mask[..., None]
            x, B, C = xBC.split([self.d_ssm, G * N, G * N], dim=-1)
            x, B, C = x.reshape(b, l, H, P), B.reshape(b, l, G, N), C.reshape(b, l, G, N)
            scan = partial(self._scan, ops)
            if cp is not None:  # each chunk from the state the chunks before it leave (exact state passing)
                y, ssm_final = cp.ssm(scan, x, dt, A, B, C), None
            else:
                y, ssm_final = scan(x, dt, A, B, C, seq_idx, ssm_init)
            if cache is not None:
                cache.set_mamba_states(self.layer_idx, conv_final, ssm_final)
            y = y.reshape(b, l, self.d_ssm)
        if self.norm is not None:
            y = self.norm(y, z, ops)
        else:
            y = y * F.silu(z)
        return self.out_proj(y.to(h.dtype))

    def _scan(self, ops, x, dt, A, B, C, seq_idx, initial):
        """The SSD scan → y (b, l, H, P), final state (b, H, P, N). Rows longer than SCAN_SEGMENT_TOKENS run in
        segments, each from the state the previous one leaves (zeroed where a document starts at the seam): exact,
        and the scan's per-chunk states — fp32, H·P·N per chunk, ~6 GiB per copy at 7B and 256K tokens, several
        copies in its backward — then exist for one segment at a time."""
        l, kw = x.size(1), dict(D=self.D, return_final_states=True)
        if l <= SCAN_SEGMENT_TOKENS:
            return ops.ssd_scan(x, dt, A, B, C, self.chunk_size, seq_idx=seq_idx, initial_states=initial, **kw)
        ys, state = [], initial
        for start in range(0, l, SCAN_SEGMENT_TOKENS):
            part = slice(start, start + SCAN_SEGMENT_TOKENS)
            ids = None
            if seq_idx is not None:
                ids = seq_idx[:, part]
                if start and state is not None:  # a document starting at the seam gets no state
                    state = state * (ids[:, 0] == seq_idx[:, start - 1]).to(state.dtype)[:, None, None, None]
                ids = ids - ids[:, :1]  # the kernels hand the initial state to document 0
            segment = (x[:, part], dt[:, part], A, B[:, part], C[:, part], self.chunk_size)
            y, state = ops.ssd_scan(*segment, seq_idx=ids, initial_states=state, **kw)
            ys.append(y)
        return torch.cat(ys, dim=1), state


def mup_vector(config: FalconH1Config) -> torch.Tensor:
    """(in_proj_dim,) per-channel multipliers of in_proj's output: ssm_multipliers over [z, x, B, C, dt]."""
    d, gn, H = config.d_ssm, config.mamba_n_groups * config.mamba_d_state, config.mamba_n_heads
    sizes = [d, d, gn, gn, H]
    return torch.cat([torch.full((s,), float(m)) for s, m in zip(sizes, config.ssm_multipliers)])


class FalconH1MLP(nn.Module):
    def __init__(self, config: FalconH1Config):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.gate_multiplier, self.down_multiplier = config.mlp_multipliers

    def forward(self, x, fused: bool = False):
        """fused: gate and up as one GEMM (Ops.fused_projections)."""
        gate_up = one_gemm(x, [self.gate_proj, self.up_proj]) if fused else None
        gate, up = gate_up or (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(up * F.silu(gate * self.gate_multiplier)) * self.down_multiplier


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
# run eagerly. The default (8) was reached by a LoRA DPO loop.
RECOMPILE_LIMIT = 64


def inductor_options() -> dict:
    """Inductor settings for compiled layers: no pointwise cat. A layer's backward assembles the gradient of
    in_proj's output as a cat of [dz, d(x, B, C) back through the conv, ddt]; a pointwise cat evaluates every
    piece under a mask at each output element (109 µs a layer on an H200 at 8K tokens, for ~30 µs of bytes), where
    a concat kernel lets each piece write its own slice. H200, 1.5B-Deep at 8K, compiled + graphs: 28,545 → 28,829
    tokens/s (docs/performance.md). Keys this torch's inductor lacks are left out."""
    import torch._inductor.config as config

    return {key: 0 for key in ("max_pointwise_cat_inputs", "max_complex_pointwise_cat_inputs") if hasattr(config, key)}


def _compiled_block(settings: tuple, device_type: str):
    """settings (backend, dynamic, options) → the compiled `FalconH1DecoderLayer.block`, compiled on first use.
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
        _COMPILED_BLOCKS[key] = torch.compile(FalconH1DecoderLayer.block, backend=backend, dynamic=dynamic, **options)
    return _COMPILED_BLOCKS[key]


_SIDE_STREAMS: dict = {}  # device → the CUDA stream every layer's attention branch runs on (_on_two_streams)


@torch.compiler.disable(recursive=False)
def _on_two_streams(ssm, attention: partial, device: torch.device):
    """→ (ssm(), attention()), attention on a side stream while the SSM branch runs on `device`'s current stream.

    The two mixers read the same normed input and meet only in the residual sum, and their kernels leave each other
    room: flash attention is compute-bound, the SSD scan's Triton kernels are short or memory-bound. H200,
    1.5B-Deep at 8K tokens, forward + backward in CUDA graphs: one layer's two mixers 1,552 → 1,318 µs, 2,599 →
    2,379 µs with their projections (bench/stream_probe.py); the training step with compiled layers in graphs
    281.6 → 270.3 ms. The backward follows: autograd runs each op's backward on its forward's stream, and makes
    the gradients that cross streams wait and record their use (its input buffers).

    Memory: the side stream waits for the current one before its branch and the current one for the side before
    the sum, so in the forward a block is reused only by work queued after every use of it. The backward has no such
    joins, so the current stream's tensors that the attention branch reads (its partial's arguments: the normed
    input, RoPE's tables, masks, document offsets), which its backward may read on the side stream after their last
    owner lets go, are recorded on the side stream. Captures into CUDA graphs: both streams join the capture through
    the waits. Dynamo runs this frame eagerly (it does not trace streams) and compiles each branch as a graph."""
    main = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.get(main.device)
    if side is None:
        side = _SIDE_STREAMS[main.device] = torch.cuda.Stream(main.device)
    side.wait_stream(main)
    for arg in attention.args:
        for t in arg if isinstance(arg, tuple) else (arg,):
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(side)
    with torch.cuda.stream(side):
        a = attention()
    m = ssm()
    main.wait_stream(side)
    return m, a


class FalconH1DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: FalconH1Config, layer_idx: int):
        super().__init__()
        self.feed_forward = FalconH1MLP(config)
        self.mamba = FalconH1Mixer(config, layer_idx)
        self.self_attn = FalconH1Attention(config, layer_idx)
        self.input_layernorm = FalconH1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_ff_layernorm = FalconH1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention_in_multiplier = config.attention_in_multiplier
        self.attention_out_multiplier = config.attention_out_multiplier
        self.ssm_out_multiplier = config.ssm_out_multiplier
        self.compiled = None  # FalconH1ForCausalLM.compile_layers: (backend, dynamic, options) of the compiled block

    def forward(
        self,
        hidden_states,
        cos=None,
        sin=None,
        attn_mask=None,
        seq_idx=None,
        packed=None,
        pad_mask=None,
        cache=None,
        ops=None,
        cp=None,
        mlp_chunk=None,
    ):
        # compiled for training forwards only: a cache's Python state and context parallelism's collectives stay eager
        eager = not self.compiled or cache is not None or cp is not None
        block = type(self).block if eager else _compiled_block(self.compiled, hidden_states.device.type)
        return block(self, hidden_states, cos, sin, attn_mask, seq_idx, packed, pad_mask, cache, ops, cp, mlp_chunk)

    def block(self, hidden_states, cos, sin, attn_mask, seq_idx, packed, pad_mask, cache, ops, cp, mlp_chunk):
        """The layer's arithmetic. `forward` runs it, under HF's activation checkpointing when that is on; a compiled
        copy of this function (one for all layers) is what `compile_layers` switches to, so a checkpointed layer
        recomputes through the compiled code too."""
        h = self.input_layernorm(hidden_states)
        # fused where launches count; not with a cache (decoding is bandwidth-bound: the weights' copy would cost more)
        fused = ops.fused_projections and cache is None
        zxbcdt, qkv = self._fused_input_projections(h) if fused else (None, None)
        ssm = partial(self._ssm_branch, h, zxbcdt, ops, seq_idx, pad_mask, cache, cp)
        attention = partial(self._attention_branch, h, qkv, ops, cos, sin, attn_mask, packed, cache, cp)
        if self._two_streams(ops, cache, cp, h):
            m, a = _on_two_streams(ssm, attention, h.device)
        else:
            m, a = ssm(), attention()
        hidden_states = hidden_states + (m + a)
        return hidden_states + self._feed_forward(self.pre_ff_layernorm(hidden_states), mlp_chunk, fused)

    def _two_streams(self, ops, cache, cp, h) -> bool:
        """Attention on a side stream (`_on_two_streams`)? Where the ops ask for it, on CUDA, without a cache (its
        Python state) or context parallelism (collectives), and not in a checkpointed layer: that recomputes inside
        the backward, on whichever stream asked for it."""
        checkpointed = self.gradient_checkpointing and self.training
        return ops.mixer_streams and cache is None and cp is None and not checkpointed and h.is_cuda

    def _ssm_branch(self, h, zxbcdt, ops, seq_idx, pad_mask, cache, cp):
        m = self.mamba(h, ops, seq_idx=seq_idx, pad_mask=pad_mask, cache=cache, cp=cp, zxbcdt=zxbcdt)
        return m * self.ssm_out_multiplier

    def _attention_branch(self, h, qkv, ops, cos, sin, attn_mask, packed, cache, cp):
        u = h * self.attention_in_multiplier if qkv is None else None
        return self.self_attn(u, cos, sin, attn_mask, cache, ops, packed, cp, qkv=qkv) * self.attention_out_multiplier

    def _fused_input_projections(self, h):
        """h (b, l, d) → (zxbcdt, (q, k, v)) from one GEMM of h against [in_proj; q; k; v], or (None, None) where
        `one_gemm` declines. The input multipliers move to the outputs (a scalar commutes with the GEMM, not with a
        bias: projections with biases stay unfused; the released models have none)."""
        mix, att = self.mamba, self.self_attn
        linears = [mix.in_proj, att.q_proj, att.k_proj, att.v_proj]
        out = None if any(m.bias is not None for m in linears) else one_gemm(h, linears)
        if out is None:
            return None, None
        zxbcdt, *qkv = out
        if self.attention_in_multiplier != 1.0:
            qkv = [t * self.attention_in_multiplier for t in qkv]
        return zxbcdt * mix.ssm_in_multiplier * mix.mup_vector, tuple(qkv)

    def _feed_forward(self, x, chunk, fused):
        """x (b, l, d). With `chunk` and autograd recording (a checkpointed layer's recompute, or a training forward),
        rows longer than `chunk` run the MLP chunk by chunk, each under its own checkpoint: what the
        layer's backward holds of the MLP is one chunk's activations, not the row's. The MLP is per token, so the
        result and every gradient are unchanged; the cost is one more MLP forward."""
        if not chunk or x.size(1) <= chunk or not torch.is_grad_enabled():
            return self.feed_forward(x, fused)
        parts = [checkpoint(self.feed_forward, part, fused, use_reentrant=False) for part in x.split(chunk, dim=1)]
        return torch.cat(parts, dim=1)


class FalconH1PreTrainedModel(PreTrainedModel):
    config_class = FalconH1Config
    config: FalconH1Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["FalconH1DecoderLayer"]
    _supports_sdpa = True
    _is_stateful = True
    _keys_to_ignore_on_load_unexpected = [r"mup_vector", r"inv_freq"]

    @torch.no_grad()
    def _init_weights(self, module):
        # transformers' `init.*` helpers skip tensors already loaded from a checkpoint; plain in-place
        # fills here would overwrite loaded weights when from_pretrained initialises what is left.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Conv1d):
            init.kaiming_uniform_(module.weight, a=5**0.5)  # PyTorch's default conv init
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (FalconH1RMSNorm, FalconH1RMSNormGated)):
            init.ones_(module.weight)
        elif isinstance(module, FalconH1Mixer):
            init.ones_(module.dt_bias)
            init.copy_(module.A_log, torch.log(torch.arange(1, module.n_heads + 1, dtype=torch.float32)))
            init.ones_(module.D)
            # non-persistent: never in a checkpoint, so always recomputed (meta-device init leaves garbage)
            module.mup_vector.copy_(mup_vector(self.config).to(module.mup_vector.device))

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring our own hybrid cache (prepare_inputs_for_generation)


class FalconH1Model(FalconH1PreTrainedModel):
    def __init__(self, config: FalconH1Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(FalconH1DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = FalconH1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self._training_graphs = None  # model.graphs.enable_training_graphs
        # padding-free execution of padded batches (FalconH1ForCausalLM.set_padding_free): without a cache, a
        # batch with padding runs as one packed row of its real tokens; outputs come back in the padded layout
        self.padding_free = False
        self.context_parallel = None  # model.context_parallel.enable_context_parallel: the row split over ranks
        self.offload_activations = False  # FalconH1ForCausalLM.enable_activation_offload
        self.mlp_chunk_tokens = None  # long rows: the MLP in checkpointed token chunks (MLP_CHUNK_TOKENS)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        seq_idx=None,
        cu_seq_lens_q=None,
        **kwargs,
    ):
        cache = kwargs.pop("cache", None) or past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            check_input_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        # µP: the embedding multiplier applies to inputs_embeds too (HF skips it there, spec §9 #9)
        hidden = inputs_embeds * self.config.embedding_multiplier
        b, l, _ = hidden.shape

        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be 2D (batch, past+current length), got {tuple(attention_mask.shape)}"
            )
        padded = attention_mask is not None and not bool(attention_mask.all())
        if self.context_parallel is not None:
            if padded or cache is not None or use_cache:
                raise ValueError("context parallelism runs packed rows without padding or a cache")
            return self._forward_context_parallel(hidden, position_ids)
        continuing = cache is not None and cache.get_seq_length() > 0
        # packed rows (padding-free): documents marked by seq_idx, cu_seq_lens or restarting position_ids
        seq_idx = None if (padded or continuing) else resolve_seq_idx(position_ids, seq_idx, cu_seq_lens_q, l)
        if use_cache is None:  # default: a cache for inference, none for training or packed rows
            use_cache = self.config.use_cache and not self.training and seq_idx is None
        if padded and self.padding_free and not use_cache and cache is None:
            return self._forward_unpadded(inputs_embeds, attention_mask, position_ids)
        if use_cache and cache is None:
            cache = FalconH1HybridCache(self.config, b)
        if seq_idx is not None and cache is not None:
            raise ValueError("packed documents (seq_idx / restarting position_ids) cannot be combined with a cache")
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if padded:
                position_ids = positions_from_attention_mask(attention_mask)[:, -l:]
            else:
                position_ids = torch.arange(past_len, past_len + l, device=hidden.device)[None].expand(b, l)
        pad_mask = attention_mask[:, -l:].to(hidden.dtype) if padded else None
        ops = get_ops(hidden.device)
        cos, sin = _rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta_value, hidden.dtype)
        # packed documents: varlen attention, or a dense document mask (the kernel bundle decides)
        packed = None
        if seq_idx is not None and ops.varlen_for_packing:
            packed = cu_seqlens_from_seq_idx(seq_idx)
        dense_docs = seq_idx if packed is None else None
        attn_mask = build_attention_mask(b, l, past_len, hidden.device, attention_mask if padded else None, dense_docs)
        graphs = self._training_graphs
        cu_seqlens = packed[0] if packed is not None else None
        if (
            graphs is not None
            and self.training
            and cache is None
            and pad_mask is None
            and graphs.matches(hidden, seq_idx, cu_seqlens)
        ):
            hidden = graphs.run(hidden, cos, sin, seq_idx, cu_seqlens)  # captured forward/backward per layer
        else:
            with self._offload_context():
                for layer in self.layers:
                    hidden = layer(
                        hidden,
                        cos=cos,
                        sin=sin,
                        attn_mask=attn_mask,
                        seq_idx=seq_idx,
                        packed=packed,
                        pad_mask=pad_mask,
                        cache=cache,
                        ops=ops,
                        mlp_chunk=self.mlp_chunk_tokens,
                    )
        if cache is not None:
            cache.advance(l)
        hidden = self.final_layernorm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{_CACHE_FIELD: cache})

    def _offload_context(self):
        """With `offload_activations`, tensors saved for backward go to pinned CPU memory during the forward. With
        reentrant per-layer checkpointing that is each layer's input: GPU memory then holds one layer's recompute."""
        if self.offload_activations and self.training and torch.is_grad_enabled():
            return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
        return nullcontext()

    def _forward_context_parallel(self, hidden, position_ids):
        """This rank's two chunks (1, 2m) of a packed row split over ranks (model/context_parallel.py)."""
        cp = self.context_parallel
        if position_ids is None:  # one document over the whole row
            position_ids = cp.default_positions(hidden.size(1), hidden.device)
        step = cp.step(position_ids)
        ops = get_ops(hidden.device)
        cos, sin = _rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta_value, hidden.dtype)
        with self._offload_context():
            for layer in self.layers:  # conv, scan and attention take their document ids from the step
                hidden = layer(hidden, cos=cos, sin=sin, ops=ops, cp=step, mlp_chunk=self.mlp_chunk_tokens)
        return BaseModelOutputWithPast(last_hidden_state=self.final_layernorm(hidden), **{_CACHE_FIELD: None})

    def _forward_unpadded(self, inputs_embeds, attention_mask, position_ids=None):
        """A padded batch (b, l) run as one packed row of its T real tokens, each row its own document (exact
        isolation in the scan, the conv and attention), then scattered back: pads get zeros, never computed."""
        l = inputs_embeds.size(1)
        keep = attention_mask[:, -l:].bool()  # (b, l)
        if position_ids is None:
            position_ids = positions_from_attention_mask(attention_mask)[:, -l:]
        rows = torch.arange(keep.size(0), device=keep.device).repeat_interleave(keep.sum(1))  # (T,) row of each token
        out = self(
            inputs_embeds=inputs_embeds[keep][None],
            position_ids=position_ids[keep][None],
            seq_idx=rows[None].to(torch.int32),
            use_cache=False,
        ).last_hidden_state  # (1, T, d)
        scattered = out.new_zeros(*keep.shape, out.size(-1)).masked_scatter(keep[..., None], out[0])
        return BaseModelOutputWithPast(last_hidden_state=scattered, **{_CACHE_FIELD: None})


def configure_backbones(model: nn.Module, **settings) -> bool:
    """Sets run-time switches (padding_free, context_parallel, offload_activations, mlp_chunk_tokens) on every
    FalconH1Model inside `model`, through PEFT or any other wrapper. False when there is none."""
    found = False
    for module in model.modules():
        if isinstance(module, FalconH1Model):
            for name, value in settings.items():
                setattr(module, name, value)
            found = True
    return found


class FalconH1ForCausalLM(FalconH1PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FalconH1Config):
        super().__init__(config)
        self.model = FalconH1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def enable_activation_offload(self, enabled: bool = True, mlp_chunk_tokens: int | None = MLP_CHUNK_TOKENS):
        """Long context on one GPU: per-layer activation checkpointing (reentrant) whose saved layer inputs live in
        pinned CPU memory; the GPU keeps one layer's recompute at a time, its MLP in checkpointed chunks of
        `mlp_chunk_tokens` (None: whole rows). Gradients are unchanged."""
        if enabled:
            self.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        self.model.offload_activations = enabled
        self.model.mlp_chunk_tokens = mlp_chunk_tokens if enabled else None
        return self

    def compile_layers(self, backend: str | None = None, dynamic: bool | None = None, **options) -> FalconH1ForCausalLM:
        """Regional torch.compile: every decoder layer's arithmetic compiled (`FalconH1DecoderLayer.block`), the same
        code serving all of them, inside HF's activation checkpointing when that is on. Inductor fuses what eager
        runs as separate kernels — norms, RoPE, the µP multipliers, the gates and the causal conv (traced as shifted
        multiply-adds) — while the scan (one custom op), attention and GEMMs stay the kernels `get_ops` chose. With
        dynamic=None the first length compiles static and the second recompiles with a symbolic length, so
        padding-free batches of varying length (TRL's packing) compile twice, not per batch. Embedding, loss and
        optimizer stay outside (the loss compiles its own chunk on CUDA, model/loss.py); forwards with a cache or
        context parallelism run eagerly. backend: default $FALCON_ALIGN_COMPILE_BACKEND, else inductor on CUDA and
        aot_eager elsewhere, decided by the device the layers run on (`_compiled_block`)."""
        settings = (backend or os.environ.get("FALCON_ALIGN_COMPILE_BACKEND"), dynamic, dict(options))
        for layer in self.model.layers:
            layer.compiled = settings
        return self

    def set_padding_free(self, enabled: bool = True) -> FalconH1ForCausalLM:
        """Run padded batches without their pads (training and scoring forwards, i.e. without a cache): the
        real tokens of all rows form one packed row with each row its own document. Outputs keep the padded
        layout and equal the padded computation; pads cost nothing. Generation is unaffected."""
        self.model.padding_free = enabled
        return self

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        labels=None,
        past_key_values=None,
        use_cache=None,
        logits_to_keep=0,
        inputs_embeds=None,
        shift_labels=None,
        num_items_in_batch=None,
        return_logits=False,
        **kwargs,
    ):
        """Causal LM forward. With `labels` (or pre-shifted `shift_labels`) the loss is a chunked CE over the
        scaled logits and the full logits are not built unless `return_logits=True`."""
        cache = kwargs.pop("cache", None) or past_key_values
        for unused in ("output_attentions", "output_hidden_states", "return_dict", "cache_position"):
            kwargs.pop(unused, None)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state
        mult = self.config.lm_head_multiplier
        loss = logits = None
        if labels is not None or shift_labels is not None:
            loss = chunked_causal_lm_loss(
                hidden,
                self.lm_head.weight,
                labels,
                mult,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
            )
        if loss is None or return_logits:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep]) * mult
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})

    # ------------------------------------------------------------------ generation
    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, use_cache=True, **kwargs
    ):
        """Feeds only the tokens the cache has not seen; positions follow the attention mask (left padding)."""
        cache = kwargs.pop("cache", None) or past_key_values
        if use_cache and cache is None:
            cache = FalconH1HybridCache(self.config, input_ids.shape[0])
        seen = cache.get_seq_length() if cache is not None else 0
        inputs = {}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
            new = inputs_embeds.shape[1]
        else:
            inputs["input_ids"] = input_ids[:, seen:]
            new = input_ids.shape[1] - seen
        if attention_mask is not None:
            inputs["position_ids"] = positions_from_attention_mask(attention_mask)[:, -new:]
        inputs.update(
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=use_cache,
            logits_to_keep=kwargs.get("logits_to_keep") or 1,
        )
        return inputs

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *args, allow_pickle: bool = False, strict: bool = True, **kwargs
    ):
        """transformers' loader, made strict: safetensors only unless `allow_pickle=True`, and any missing,
        unexpected or mis-shaped tensor is an error naming the key."""
        path = Path(os.fspath(pretrained_model_name_or_path))
        if path.is_dir() and not allow_pickle:
            has_safetensors = any(path.glob("*.safetensors"))
            pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            if pickles and not has_safetensors:
                raise ValueError(
                    f"{path}: only pickle checkpoints found ({', '.join(pickles)}); pickles can run arbitrary code "
                    "when loaded. Convert to safetensors, or pass allow_pickle=True if you trust the source."
                )
        if not allow_pickle:
            kwargs.setdefault("use_safetensors", True)
        kwargs["output_loading_info"] = True
        if strict:  # let transformers finish loading, then name every mismatch ourselves
            kwargs.setdefault("ignore_mismatched_sizes", True)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if strict:
            _raise_on_loading_problems(path, info, model)
        return model


def _raise_on_loading_problems(path, info, model) -> None:
    problems = []
    tied = set(model._tied_weights_keys or {}) if model.config.tie_word_embeddings else set()
    missing = [k for k in info.get("missing_keys", []) if k not in tied]
    if missing:
        problems.append(f"missing keys: {sorted(missing)}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected keys: {sorted(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        problems.append("shape mismatches (key, checkpoint, model): " + str(sorted(info["mismatched_keys"])))
    if problems:
        raise ValueError(f"{path}: checkpoint does not match FalconH1ForCausalLM — " + "; ".join(problems))
