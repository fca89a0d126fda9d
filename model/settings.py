"""The run-time choices of the fast path, in one typed place.

    from model.settings import configure, settings
    configure(fused_projections=False)      # the model's API; recipes set the same fields (AlignArguments.runtime)
    settings().mixer_streams                # what the code reads

Every field has a default that suits where it runs; `configure` changes them for the process (the kernel choice is
made again after a change). For A/B runs without editing code or a recipe, an environment variable
FALCON_ALIGN_<FIELD> (FALCON_ALIGN_FUSED_PROJECTIONS=0, FALCON_ALIGN_KERNELS=reference, ...) overrides a default. It
is read here once, at import, parsed one way (booleans: 1/0, true/false, yes/no, on/off), and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

ENV_PREFIX = "FALCON_ALIGN_"
KERNEL_PROVIDERS = ("auto", "triton", "mamba-ssm", "reference")


@dataclass(frozen=True)
class Settings:
    # who supplies the fast ops on CUDA (model/kernels; the CPU always runs the reference):
    #   "auto"      our Triton kernels where triton imports (it comes with PyTorch's CUDA wheels), else the reference
    #   "triton"    our Triton kernels, an error where triton does not import
    #   "mamba-ssm" mamba-ssm's Triton kernels and causal-conv1d's conv (the `mamba` extra), an error without mamba-ssm
    #   "reference" the pure-PyTorch ops (model/kernels/ref.py) everywhere
    # The SSD scan (model/kernels/cuda.py `_ssd_scan_for`): ours (model/kernels/ssd.py) under "triton"; under "auto"
    # mamba-ssm's where it is installed, else ours. PyTorch's flash varlen attention under every one where it exists.
    kernels: str = "auto"
    # a layer's q, k, v and in_proj as one GEMM, gate and up as another, on the fast ops (not in training graphs, where
    # the fused gradients' assembly costs more than the launches it saves; not with a cache)
    fused_projections: bool = True
    # each layer's attention on a side CUDA stream beside its SSM branch. None: in training graphs only (outside them
    # the branches' extra launches cost more than the overlap gives); never under torch.distributed
    mixer_streams: bool | None = None
    # mamba-ssm's own scan backward (recomputing the chunk states) for every row, not only rows that must
    ssd_recompute: bool = False
    # torch.compile backend of compiled layers. None: inductor on CUDA, aot_eager elsewhere
    compile_backend: str | None = None
    # the chunked loss compiled on CUDA
    compile_loss: bool = True

    def __post_init__(self):
        if self.kernels not in KERNEL_PROVIDERS:
            raise ValueError(f"kernels must be one of {', '.join(map(repr, KERNEL_PROVIDERS))}, got {self.kernels!r}")


def _parse(name: str, raw: str, default):
    """An environment value → the field's type: booleans one way, None from '' or 'none', strings as they are."""
    if name in ("kernels", "compile_backend"):
        return None if raw.lower() in ("", "none") else raw
    value = raw.strip().lower()
    if name == "mixer_streams" and value in ("", "none", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r}: expected one of 1/0, true/false, yes/no, on/off")


def _from_environment(base: Settings) -> Settings:
    changes = {}
    for f in fields(Settings):
        raw = os.environ.get(ENV_PREFIX + f.name.upper())
        if raw is not None:
            changes[f.name] = _parse(f.name, raw, f.default)
    try:
        return replace(base, **changes)
    except ValueError as err:
        names = ", ".join(ENV_PREFIX + name.upper() for name in changes)
        raise ValueError(f"from the environment ({names}): {err}") from err


_current = _from_environment(Settings())


def settings() -> Settings:
    return _current


def configure(**changes) -> Settings:
    """Change fields for this process (unknown names are errors); → the settings now in force."""
    global _current
    known = {f.name for f in fields(Settings)}
    unknown = set(changes) - known
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")
    _current = replace(_current, **changes)
    from .kernels import reset_choice  # the kernel choice depends on `kernels`

    reset_choice()
    return _current


@contextmanager
def overridden(**changes) -> Iterator[Settings]:
    """`configure` for a block, restored after it (tests, A/B runs in one process)."""
    before = _current
    try:
        yield configure(**changes)
    finally:
        configure(**{f.name: getattr(before, f.name) for f in fields(Settings)})
