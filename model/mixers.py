"""Falcon-H1's two mixers, which every layer runs side by side on the same normed input: grouped-query attention
with RoPE (`FalconH1Attention`) and Mamba-2 (`FalconH1Mixer`), with their norms. Parameter names are transformers'
own; kernels come from the `Ops` bundle the caller passes (model/kernels)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .config import FalconH1Config
from .kernels.ref import rmsnorm_gated_ref, rmsnorm_ref

# longer rows run the SSD scan in segments of this many tokens with exact state passing (FalconH1Mixer._scan)
SCAN_SEGMENT_TOKENS = 32768


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
        # backward), where the fast kernel would stay one opaque op with those as kernels of their own
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
            # the scan discretises dt (dt_bias, softplus, limit) where nothing else needs it: ours in its kernels
            discretize = dict(dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.time_step_limit)
            if pad_mask is not None or cp is not None:  # a pad: dt = 0 exactly; context parallelism reads dt
                dt, discretize = self._discretized(dt), {}
            if pad_mask is not None:  # a pad neither feeds nor decays the state: dt = 0, x = 0
                xBC = xBC * pad_mask[..., None]
                dt = dt * pad_mask[..., None]
            x, B, C = xBC.split([self.d_ssm, G * N, G * N], dim=-1)
            x, B, C = x.reshape(b, l, H, P), B.reshape(b, l, G, N), C.reshape(b, l, G, N)
            scan = partial(self._scan, ops, discretize)
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

    def _discretized(self, dt):
        """raw dt (b, l, H) → softplus(dt + dt_bias) within time_step_limit, fp32."""
        dt = F.softplus(dt.float() + self.dt_bias.float())
        return dt.clamp(*self.time_step_limit) if self.time_step_limit != (0.0, float("inf")) else dt

    def _scan(self, ops, discretize, x, dt, A, B, C, seq_idx, initial):
        """The SSD scan → y (b, l, H, P), final state (b, H, P, N); dt raw with `discretize` (dt_bias, softplus,
        limit: the scan applies them) or already discretised without. Rows longer than SCAN_SEGMENT_TOKENS run in
        segments, each from the state the previous one leaves (zeroed where a document starts at the seam): exact,
        and the scan's per-chunk states — fp32, H·P·N per chunk, ~6 GiB per copy at 7B and 256K tokens, several
        copies in its backward — then exist for one segment at a time."""
        l, kw = x.size(1), dict(D=self.D, return_final_states=True, **discretize)
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
