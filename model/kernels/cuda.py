"""Fast CUDA twins of the reference ops (the GPU issue fills this in).

`available_ops()` returns {op_name: callable} for the ops that can run here with the reference signature;
`get_ops` falls back to `ref.py` for the rest. Every import is guarded: this module must import on a CPU
machine without mamba-ssm or causal-conv1d.
"""

from __future__ import annotations


def available_ops() -> dict:
    return {}
