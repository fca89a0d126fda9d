"""The PyTorch twins of causal-conv1d's forward and backward that the reference's mamba-ssm training kernel calls
(bench/reference_kernels.py): against a per-document depthwise conv, gradients included."""

import sys

import pytest
import torch
import torch.nn.functional as F

from bench import reference_kernels


def per_document_conv(x, weight, bias, bounds, silu):
    """x (b, d, l) → y (b, d, l): each document [a, b) of `bounds` convolved on its own, zeros before its start."""
    k = weight.size(1)
    pieces = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = F.pad(x[..., a:b], (k - 1, 0))
        pieces.append(F.conv1d(seg, weight[:, None, :], bias, groups=x.size(1)))
    y = torch.cat(pieces, dim=-1)
    return F.silu(y) if silu else y


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_twins_keep_documents_apart_forward_and_backward(silu, with_bias):
    torch.manual_seed(0)
    b, d, l, k = 2, 6, 23, 4
    bounds = [0, 5, 6, 15, 23]  # a one-token document, and documents shorter than the kernel
    seq_idx = torch.cat([torch.full((e - s,), i) for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))])
    seq_idx = seq_idx[None].expand(b, l).contiguous().int()
    x = torch.randn(b, l, d, dtype=torch.float64).transpose(1, 2)  # (b, d, l) with channel-last strides, as mamba-ssm
    weight = torch.randn(d, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(d, dtype=torch.float64, requires_grad=True) if with_bias else None
    x.requires_grad_()
    want = per_document_conv(x, weight, bias, bounds, silu)
    got = reference_kernels.conv_fwd(x.detach(), weight.detach(), bias, seq_idx, None, None, silu)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    dout = torch.randn_like(want)
    grads = torch.autograd.grad(want, [x, weight] + ([bias] if with_bias else []), dout)
    buffer = torch.zeros(b, l, d, dtype=torch.float64).transpose(1, 2)  # the caller's gradient buffer, written into
    dx, dweight, dbias, dinit = reference_kernels.conv_bwd(
        x.detach(), weight.detach(), bias, dout, seq_idx, None, None, buffer, False, silu
    )
    assert dx is buffer and dinit is None
    torch.testing.assert_close(dx, grads[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dweight, grads[1], rtol=1e-12, atol=1e-12)
    if with_bias:
        torch.testing.assert_close(dbias, grads[2], rtol=1e-12, atol=1e-12)
    else:
        assert dbias is None


def test_conv_twins_refuse_conv_states():
    x, w = torch.randn(1, 3, 5), torch.randn(3, 4)
    with pytest.raises(NotImplementedError, match="no conv states"):
        reference_kernels.conv_fwd(x, w, None, None, torch.zeros(1, 3, 3), None, True)


def test_load_says_when_transformers_fixed_its_kernels_first(monkeypatch):
    monkeypatch.setattr(reference_kernels, "loaded", None)
    monkeypatch.setitem(sys.modules, reference_kernels.HF_MODELING, object())
    assert reference_kernels.load().startswith(f"unknown: {reference_kernels.HF_MODELING} was imported before")
    monkeypatch.setattr(reference_kernels, "loaded", None)
    monkeypatch.delitem(sys.modules, reference_kernels.HF_MODELING)
    if not torch.cuda.is_available():
        assert reference_kernels.load() == "transformers' PyTorch paths (mamba-ssm not available)"
