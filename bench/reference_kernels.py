"""mamba-ssm's kernels for the reference (transformers' FalconH1ForCausalLM) on a machine where `import mamba_ssm`
fails (no `selective_scan_cuda`) and causal-conv1d is not installed: the usual state of a machine that cannot
compile either CUDA extension.

transformers picks each Mamba-2 kernel when `modeling_falcon_h1` is imported: mamba-ssm's where `import mamba_ssm`
works, its PyTorch twin otherwise. So `load()` runs before that module is imported (`python -m bench` calls it before
importing a benchmark):
1. it registers mamba-ssm's Triton modules the way falcon-align's own kernels do (`import_mamba_triton`), so
   transformers finds mamba-ssm;
2. transformers' training forward runs mamba-ssm's fused conv + scan (`mamba_split_conv1d_scan_combined`), which
   calls causal-conv1d's CUDA conv forward and backward. Without causal-conv1d those are None and the call raises
   TypeError; `load()` supplies PyTorch twins of the two functions (`model.kernels.ref.causal_conv1d_ref`, its
   backward by autograd), which keep packed documents apart like causal-conv1d does.
The SSD scan, the heaviest part, is then mamba-ssm's Triton kernel, as a user with mamba-ssm installed gets it; the
conv alone is slower than causal-conv1d's. Results record what the reference ran (`reference_kernels`).
"""

from __future__ import annotations

import logging
import sys

import torch

from model.kernels.ref import causal_conv1d_ref

HF_MODELING = "transformers.models.falcon_h1.modeling_falcon_h1"
loaded: str | None = None  # what the reference runs, once load() has run
logger = logging.getLogger("falcon_align.bench")


def conv_fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu):
    """causal-conv1d's `causal_conv1d_fwd_function`: x (b, d, l), weight (d, k), bias (d,), seq_idx (b, l) → y
    (b, d, l). Initial and final states are not used by the training forward."""
    if initial_states is not None or final_states_out is not None:
        raise NotImplementedError("the PyTorch conv twin serves the training forward only (no conv states)")
    return causal_conv1d_ref(x, weight, bias, seq_idx, activation="silu" if silu else None)


def conv_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, return_dinitial_states, silu):
    """causal-conv1d's `causal_conv1d_bwd_function` → (dx, dweight, dbias, None): the forward again under autograd.
    dx, when given, is the buffer the gradient goes to (a view into the caller's gradient of its input)."""
    if initial_states is not None or dfinal_states is not None or return_dinitial_states:
        raise NotImplementedError("the PyTorch conv twin serves the training forward only (no conv states)")
    xg, wg, bg = (None if t is None else t.detach().requires_grad_() for t in (x, weight, bias))
    with torch.enable_grad():
        y = conv_fwd(xg, wg, bg, seq_idx, None, None, silu)
        dxg, dweight, *dbias = torch.autograd.grad(y, [t for t in (xg, wg, bg) if t is not None], dout)
    if dx is None:
        dx = dxg
    else:
        dx.copy_(dxg)
    return dx, dweight, (dbias[0] if dbias else None), None


def load() -> str:
    """Makes mamba-ssm's kernels available to transformers' Falcon-H1 (see the module's docstring) → what the
    reference will run, as results record it. Idempotent. Run in a process that already imported transformers'
    modeling module (a test, say), it cannot change transformers' choice and says so."""
    global loaded
    if loaded is not None:
        return loaded
    late = HF_MODELING in sys.modules
    from model.kernels.cuda import import_mamba_triton

    mods = import_mamba_triton() if torch.cuda.is_available() else None
    if mods is None:
        loaded = "transformers' PyTorch paths (mamba-ssm not available)"
    elif mods[0].causal_conv1d_fwd_function is None:
        mods[0].causal_conv1d_fwd_function, mods[0].causal_conv1d_bwd_function = conv_fwd, conv_bwd
        loaded = "mamba-ssm's Triton kernels; the causal conv in PyTorch (causal-conv1d not installed)"
    else:
        loaded = "mamba-ssm's Triton kernels and causal-conv1d"
    if late:
        loaded = f"unknown: {HF_MODELING} was imported before bench.reference_kernels.load() (else: {loaded})"
        logger.warning("the reference's kernels are %s", loaded)
    return loaded
