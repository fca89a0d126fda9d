"""Fast CUDA twins of the reference ops, each with the reference signature.

`available_ops()` returns {op_name: callable} for what can run here; `get_ops` falls back to `ref.py` for
the rest. Every import is guarded: this module imports on a CPU machine without mamba-ssm or causal-conv1d.

mamba-ssm 2.3.0–2.3.2.post1: `import mamba_ssm` runs its package `__init__`, which needs the Mamba-1 CUDA
extension `selective_scan_cuda` (and the Mamba-3 stack) although every Mamba-2 op we use is pure Triton. When
that import fails we register the package without running its `__init__` and import the Triton modules
directly (`_import_mamba_triton`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
import types

import torch

logger = logging.getLogger("falcon_align.kernels")


def _import_mamba_triton():
    """→ (ssd_combined, selective_state_update, layernorm_gated) modules, or None."""
    names = ("ssd_combined", "selective_state_update", "layernorm_gated")
    try:
        return tuple(importlib.import_module(f"mamba_ssm.ops.triton.{n}") for n in names)
    except ImportError as err:
        first_error = err
    spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
    if spec is None or not spec.submodule_search_locations:
        logger.info("mamba-ssm Triton kernels unavailable: %s", first_error)
        return None
    # register the package without running its __init__ (which needs selective_scan_cuda)
    for key in [k for k in sys.modules if k == "mamba_ssm" or k.startswith("mamba_ssm.")]:
        del sys.modules[key]
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__file__ = spec.origin
    sys.modules["mamba_ssm"] = package
    try:
        mods = tuple(importlib.import_module(f"mamba_ssm.ops.triton.{n}") for n in names)
    except ImportError as err:
        logger.info("mamba-ssm Triton kernels unavailable: %s (first: %s)", err, first_error)
        return None
    logger.info("mamba-ssm imported without its package __init__ (%s)", first_error)
    return mods


def _ssd_scan(ssd_combined):
    scan = ssd_combined.mamba_chunk_scan_combined

    def ssd_scan(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=None,
        z=None,
        dt_bias=None,
        initial_states=None,
        seq_idx=None,
        dt_softplus=False,
        dt_limit=(0.0, float("inf")),
        return_final_states=False,
    ):
        if seq_idx is not None:
            seq_idx = seq_idx.to(torch.int32).contiguous()
        if initial_states is not None:
            initial_states = initial_states.float()
        out = scan(
            x,
            dt,
            A,
            B,
            C,
            chunk_size,
            D=D,
            z=z,
            dt_bias=dt_bias,
            initial_states=initial_states,
            seq_idx=seq_idx,
            dt_softplus=dt_softplus,
            dt_limit=tuple(dt_limit),
            return_final_states=return_final_states,
        )
        if return_final_states:
            y, final = out
            return y, final.float()
        return out

    return ssd_scan


def _state_update(ssu):
    update = ssu.selective_state_update

    def selective_state_update(
        state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf"))
    ):
        if tuple(dt_limit) != (0.0, float("inf")):
            raise NotImplementedError("dt_limit in the Triton state update")
        h, p = x.shape[1], x.shape[2]
        n = state.shape[-1]
        if dt_bias is None:  # the kernel reads dt_bias's strides unconditionally
            dt_bias = torch.zeros(h, device=x.device, dtype=torch.float32)
        # the Triton kernel takes per-(head, channel) parameters: broadcast ours over P (views, no copies)
        return update(
            state,
            x,
            dt[..., None].expand(-1, -1, p),
            A.float()[:, None, None].expand(h, p, n),
            B,
            C,
            D=None if D is None else D[:, None].expand(h, p),
            z=z,
            dt_bias=None if dt_bias is None else dt_bias[:, None].expand(h, p),
            dt_softplus=dt_softplus,
        )

    return selective_state_update


def _rmsnorm_gated(layernorm_gated):
    fn = layernorm_gated.rmsnorm_fn

    def rmsnorm_gated(x, z, weight, eps, group_size, norm_before_gate=False):
        shape = x.shape
        y = fn(
            x.reshape(-1, shape[-1]),
            weight,
            None,
            z=None if z is None else z.reshape(-1, shape[-1]),
            eps=eps,
            group_size=group_size,
            norm_before_gate=norm_before_gate,
        )
        return y.view(shape)

    return rmsnorm_gated


def _varlen_attention():
    """PyTorch's own flash-attention varlen entry point (torch ≥ 2.9), adapted to our signature."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters

    from .ref import varlen_attention_ref

    def varlen_attention(q, k, v, cu_seqlens, max_len, scale):
        # q (T, H, D); k, v (T, KV, D); causal within each document. Flash runs fp16/bf16 only.
        if q.dtype not in (torch.float16, torch.bfloat16):
            return varlen_attention_ref(q, k, v, cu_seqlens, max_len, scale)
        kw = {}
        if "enable_gqa" in params:
            kw["enable_gqa"] = k.shape[1] != q.shape[1]
        elif k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if "is_causal" in params:
            kw["is_causal"] = True
        else:
            kw["window_size"] = (-1, 0)
        if "scale" in params:
            kw["scale"] = scale
        elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
            raise NotImplementedError("varlen_attn without a scale argument")
        cu = cu_seqlens.to(torch.int32)
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)

    return varlen_attention


def available_ops() -> dict:
    if not torch.cuda.is_available():
        return {}
    ops = {}
    mamba = _import_mamba_triton()
    if mamba is not None:
        ssd_combined, ssu, layernorm_gated = mamba
        ops.update(
            ssd_scan=_ssd_scan(ssd_combined),
            selective_state_update=_state_update(ssu),
            rmsnorm_gated=_rmsnorm_gated(layernorm_gated),
        )
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except ImportError:
        pass
    else:
        ops.update(
            causal_conv1d=_causal_conv1d(causal_conv1d_fn),
            causal_conv1d_update=lambda x, s, w, b=None, activation=None: causal_conv1d_update(
                x, s, w, b, activation=activation
            ),
        )
    attention = _varlen_attention()
    if attention is not None:
        ops["varlen_attention"] = attention
    return ops


def _causal_conv1d(causal_conv1d_fn):
    from .ref import causal_conv1d_ref

    def causal_conv1d(
        x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False, activation=None
    ):
        # causal-conv1d cannot combine seq_idx with initial states; that case (packed + cache) never occurs
        if initial_states is not None or return_final_states:
            return causal_conv1d_ref(x, weight, bias, seq_idx, initial_states, return_final_states, activation)
        return causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx, activation=activation)

    return causal_conv1d
