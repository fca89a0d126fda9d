"""The one place that decides which kernels run.

`get_ops(device)` returns an `Ops` bundle. The reference bundle (pure PyTorch, `ref.py`) runs anywhere and is
the oracle the fast kernels are tested against. On CUDA, `cuda.py` may supply fast twins with the same
signatures; any op it cannot supply falls back to the reference. The choice is logged once per device.
Set `FALCON_ALIGN_KERNELS=ref` to force the reference path everywhere.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from . import ref

logger = logging.getLogger("falcon_align.kernels")


@dataclass(frozen=True)
class Ops:
    name: str
    ssd_scan: Callable
    causal_conv1d: Callable
    causal_conv1d_update: Callable
    selective_state_update: Callable
    rmsnorm_gated: Callable
    varlen_attention: Callable
    # how packed documents are attended: True → `varlen_attention` over the flattened rows (a fast kernel);
    # False → one dense per-row mask (cheaper than a Python loop over documents when no kernel exists)
    varlen_for_packing: bool = False
    # True → a layer's projections of one input run as one GEMM over concatenated weights (q, k, v with in_proj;
    # gate with up): fewer, larger GEMMs and one input gradient instead of a sum of several. The reference keeps
    # transformers' op order; FALCON_ALIGN_FUSE_PROJECTIONS=0 turns it off on CUDA.
    fused_projections: bool = False
    # True → a layer's attention runs on a side CUDA stream beside its SSM branch (model.modeling._on_two_streams).
    # On where launches are free, i.e. in training graphs (model/graphs.py); not otherwise: under compile_layers the
    # branches' graph breaks and stream switches cost more than the overlap saved (`mixer_streams_default`; eager
    # layers not measured)
    mixer_streams: bool = False


REFERENCE = Ops(
    name="reference",
    ssd_scan=ref.ssd_scan_ref,
    causal_conv1d=ref.causal_conv1d_ref,
    causal_conv1d_update=ref.causal_conv1d_update_ref,
    selective_state_update=ref.selective_state_update_ref,
    rmsnorm_gated=ref.rmsnorm_gated_ref,
    varlen_attention=ref.varlen_attention_ref,
)

_chosen: dict[str, Ops] = {}


def _fast_ops() -> Ops | None:
    try:
        from . import cuda
    except ImportError as err:  # the module itself guards its imports; this is belt and braces
        logger.info("falcon-align kernels: CUDA ops unavailable (%s)", err)
        return None
    overrides = cuda.available_ops()
    if not overrides:
        return None
    fused = os.environ.get("FALCON_ALIGN_FUSE_PROJECTIONS", "1") != "0"
    streams = mixer_streams_default(graphs=False)
    return replace(
        REFERENCE,
        name="cuda[" + ",".join(sorted(overrides)) + "]" + "+fused-projections" * fused + "+mixer-streams" * streams,
        varlen_for_packing="varlen_attention" in overrides,
        fused_projections=fused,
        mixer_streams=streams,
        **overrides,
    )


def get_ops(device: torch.device | str) -> Ops:
    device = torch.device(device)
    key = device.type
    if key not in _chosen:
        ops = REFERENCE
        if device.type == "cuda" and os.environ.get("FALCON_ALIGN_KERNELS", "auto") != "ref":
            ops = _fast_ops() or REFERENCE
        logger.info("falcon-align kernels on %s: %s", key, ops.name)
        _chosen[key] = ops
    ops = _chosen[key]
    return ops if not ops.mixer_streams or streams_allowed() else _one_stream(ops)


def mixer_streams_default(graphs: bool) -> bool:
    """Whether the mixers take two streams by default: FALCON_ALIGN_MIXER_STREAMS=1 wherever the CUDA ops run, 0
    nowhere, unset only in training graphs. Read when the ops are chosen (the first `get_ops`, or after
    `reset_choice`) and when graphs are captured. H200, 1.5B-Deep at 8K tokens: compiled + graphs 29,094 → 30,302
    tokens/s; `compile_layers` without graphs 19,441 → 16,279 (launch-bound: the streams add graph breaks and
    launches)."""
    setting = os.environ.get("FALCON_ALIGN_MIXER_STREAMS")
    return (setting == "1" or (graphs and setting != "0")) and streams_allowed()


def streams_allowed() -> bool:
    """False under torch.distributed: DDP's and FSDP's gradient hooks order their collectives after the stream the
    hook fires on, and a weight gradient still being written on the side stream could be reduced early."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


@functools.cache
def _one_stream(ops: Ops) -> Ops:
    return replace(ops, name=ops.name.replace("+mixer-streams", ""), mixer_streams=False)


def reset_choice() -> None:
    """Forget the cached choice (tests flip FALCON_ALIGN_KERNELS)."""
    _chosen.clear()
