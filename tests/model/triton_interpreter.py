"""Triton's CPU interpreter (TRITON_INTERPRET=1) made to compute bf16 as the GPU does: `tl.dot` on bf16 operands
multiplies their values (the interpreter multiplies their bit patterns), and fp32 → bf16 rounds to nearest even
(the interpreter truncates). And with numpy ≥ 2.4 a scalar argument used as a loop bound (`range(n)`) converts: the
interpreter holds scalars as one-element arrays, which `int()` no longer takes. `patch()` before the first kernel runs.
`run_json` runs a check module under the interpreter in a fresh process."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]


def run_json(module: str, *args: str, timeout: float) -> dict:
    """`python -m <module> <args>` in a fresh process with TRITON_INTERPRET=1 (Triton reads it when the kernels are
    defined, so it cannot be switched on in the test's own process) → the JSON object of its last output line."""
    site = str(Path(importlib.util.find_spec("triton").origin).parents[1])  # triton's folder, wherever installed
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([site, str(ROOT)]))
    command = [sys.executable, "-m", module, *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16).float().numpy()


def _f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    rounded = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    return rounded.view(torch.int16).numpy().view(np.uint16)


def patch() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_bf16_patched", False):
        return
    dot, cast = builder.create_dot, builder.cast_impl

    def as_f32(handle):
        if handle.dtype.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_bf16_bits_to_f32(handle.data), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, as_f32(a), as_f32(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_f32_to_bf16_bits(src.data), tl.bfloat16)
        return cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl, builder._bf16_patched = create_dot, cast_impl, True
    patch_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor
