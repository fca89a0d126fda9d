"""The one place that decides which kernels run.

`get_ops(device)` returns an `Ops` bundle. The reference bundle (pure PyTorch, `ref.py`) runs anywhere and is
the oracle the fast kernels are tested against. On CUDA, `cuda.py` supplies fast twins with the same signatures
from the provider `model.settings.kernels` names ("auto" and "triton": our Triton kernels, `state_update.py` and
`gated_norm.py`; "mamba-ssm": mamba-ssm's and causal-conv1d's); any op the provider cannot supply falls back to
the reference. The choice is logged once per device, naming each fast op's supplier.
`model.settings.configure(kernels="reference")` forces the reference path everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..settings import settings
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
    # True where any op is a fast twin: the layer then fuses its projections (model.settings.fused_projections)
    fast: bool = False


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


def _fast_ops(provider: str) -> Ops | None:
    """The reference bundle with `provider`'s fast twins in place (model/kernels/cuda.py), or None if it has none."""
    try:
        from . import cuda
    except ImportError as err:  # the module itself guards its imports; this is belt and braces
        logger.info("falcon-align kernels: CUDA ops unavailable (%s)", err)
        return None
    supplied = cuda.available_ops(provider)  # {op: (supplier, callable)}
    if not supplied:
        return None
    return replace(
        REFERENCE,
        name="cuda[" + ",".join(f"{op}:{supplier}" for op, (supplier, _) in sorted(supplied.items())) + "]",
        varlen_for_packing="varlen_attention" in supplied,
        fast=True,
        **{op: fn for op, (_, fn) in supplied.items()},
    )


def get_ops(device: torch.device | str) -> Ops:
    """The kernels for `device`: chosen once per device type (model.settings.kernels), logged once. Raises where
    an explicit provider ("triton", "mamba-ssm") cannot run on a CUDA device."""
    device = torch.device(device)
    key = device.type
    if key not in _chosen:
        provider = settings().kernels
        ops = REFERENCE
        if device.type == "cuda" and provider != "reference":
            ops = _fast_ops(provider) or REFERENCE
        logger.info("falcon-align kernels on %s: %s", key, ops.name)
        _chosen[key] = ops
    return _chosen[key]


def mixer_streams_wanted(in_graphs: bool) -> bool:
    """Whether a layer's attention takes a side stream (model.settings.mixer_streams): None → in training graphs
    only; never under torch.distributed."""
    setting = settings().mixer_streams
    return (setting is True or (setting is None and in_graphs)) and streams_allowed()


def streams_allowed() -> bool:
    """False under torch.distributed: DDP's and FSDP's gradient hooks order their collectives after the stream the
    hook fires on, and a weight gradient still being written on the side stream could be reduced early."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def reset_choice() -> None:
    """Forget the cached choice (model.settings.configure calls it)."""
    _chosen.clear()
