"""model.settings.fused_projections (the default on the fast ops): a layer's q, k, v and in_proj as one GEMM, gate and up as another.

Checked on CPU by switching it on over the reference kernels: the same function as transformers' model (fp64,
every multiplier ≠ 1, so the input multipliers really move to the outputs), packed rows equal the unfused path and
bf16 stays as accurate, the GEMMs are really merged (counted), the backward keeps no concatenated weights, and what
must not fuse does not: PEFT adapters, hooked modules, biased input projections, forwards with a cache.
"""

import copy
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import model.acceleration as acceleration
import model.modeling as modeling
from model.kernels import REFERENCE
from tests.conftest import assert_as_accurate, hf_twin, rel_err, tiny_model

FUSED = replace(REFERENCE, name="reference+fused", fast=True)  # the fast flag: projections fuse (settings default)


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setattr(modeling, "get_ops", lambda device: FUSED)


class CountGemms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
        return func(*args, **(kwargs or {}))


def test_fused_model_matches_unfused_and_transformers(monkeypatch):
    """fp64: fused and unfused are the same function (1e-12: only summation order differs); both within 1e-6 of
    transformers, whose fp64 run keeps some fp32 steps (the unfused path's own distance is 3e-7)."""
    ours = tiny_model(seed=4, dtype=torch.float64, mamba_n_groups=2).train()
    hf = hf_twin(ours).train()
    ids = torch.randint(0, ours.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    runs = {}
    for ops in (REFERENCE, FUSED):
        monkeypatch.setattr(modeling, "get_ops", lambda device, ops=ops: ops)
        ours.zero_grad()
        out = ours(ids, labels=ids, return_logits=True)
        out.loss.backward()
        runs[ops.name] = out.logits.detach(), {n: p.grad.clone() for n, p in ours.named_parameters()}
    (logits_ref, grads_ref), (logits, grads) = runs.values()
    assert rel_err(logits, logits_ref) < 1e-12
    for name, g in grads.items():
        assert rel_err(g, grads_ref[name]) < 1e-12, name
    ref = hf(ids, labels=ids)
    ref.loss.backward()
    assert rel_err(logits, ref.logits) < 1e-6
    for name, p in hf.named_parameters():
        assert rel_err(grads[name], p.grad) < 1e-5, name


def test_fused_bf16_is_as_accurate_as_unfused(monkeypatch):
    """bf16: the multipliers applied after the GEMM round differently from transformers' order; against fp32 on the
    same weights the fused path stays as accurate as the unfused one."""
    base = tiny_model(seed=1, mamba_n_groups=2, mamba_chunk_size=16, mamba_d_state=16).to(torch.bfloat16).train()
    ids = torch.randint(0, 97, (2, 100), generator=torch.Generator().manual_seed(0))

    def run(ops, model):
        monkeypatch.setattr(modeling, "get_ops", lambda device: ops)
        model.zero_grad()
        out = model(ids, labels=ids, return_logits=True)
        out.loss.backward()
        return out.logits.float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}

    truth = run(REFERENCE, copy.deepcopy(base).float())
    unfused = run(REFERENCE, base)
    fused = run(FUSED, base)
    assert rel_err(fused[0], unfused[0]) > 0  # the two paths really differ in bf16
    assert_as_accurate(fused, unfused, truth)


def test_fused_forward_runs_fewer_gemms(monkeypatch):
    """Per layer 9 GEMMs unfused (q, k, v, in_proj, o, out_proj, gate, up, down), 5 fused; plus the head."""
    ours = tiny_model(seed=5)
    ids = torch.randint(0, ours.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    counts = {}
    for ops in (REFERENCE, FUSED):
        monkeypatch.setattr(modeling, "get_ops", lambda device, ops=ops: ops)
        with torch.no_grad(), CountGemms() as mode:
            ours(ids, use_cache=False)
        counts[ops.name] = mode.n
    layers = ours.config.num_hidden_layers
    assert counts["reference"] - counts["reference+fused"] == 4 * layers, counts


def test_fused_packed_rows_equal_unfused_and_generation_is_unchanged(monkeypatch):
    """Packed rows (two documents, no cache: fused) equal the unfused path; generation (a cache: never fused) gives
    the same tokens with the fused ops selected."""
    ours = tiny_model(seed=6)
    ids = torch.randint(1, ours.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    pos = torch.cat([torch.arange(7), torch.arange(13)])[None]  # two documents in one row
    results = {}
    for ops in (REFERENCE, FUSED):
        monkeypatch.setattr(modeling, "get_ops", lambda device, ops=ops: ops)
        with torch.no_grad():
            packed = ours(ids, position_ids=pos).logits
            generated = ours.generate(ids[:, :9], max_new_tokens=6, do_sample=False, min_new_tokens=6)
        results[ops.name] = packed, generated
    (packed_ref, gen_ref), (packed_fused, gen_fused) = results.values()
    assert rel_err(packed_fused, packed_ref) < 1e-5
    assert torch.equal(gen_fused, gen_ref)


def test_peft_adapters_take_the_unfused_path(fused):
    peft = pytest.importorskip("peft")
    ours = tiny_model(seed=7)
    lora = peft.get_peft_model(ours, peft.LoraConfig(r=4, target_modules=["q_proj", "up_proj"], lora_dropout=0.0))
    layer = lora.base_model.model.model.layers[0]
    assert acceleration.one_gemm(torch.zeros(1, 48), [layer.self_attn.q_proj, layer.self_attn.k_proj]) is None
    with torch.no_grad():  # adapters with non-zero B, so they change the output
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, ours.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fused_out = lora(ids).logits
        modeling.get_ops = lambda device: REFERENCE  # restored by the fixture's monkeypatch
        unfused_out = lora(ids).logits
    assert rel_err(fused_out, unfused_out) < 1e-6


def test_concat_linear_gradients_and_saved_tensors():
    """The fused GEMM's backward (gradcheck, fp64, frozen weights too) saves the weights themselves, never their
    concatenation: no extra copy of the weights lives between forward and backward."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    weights = [torch.randn(n, 6, dtype=torch.float64, generator=gen, requires_grad=True) for n in (4, 2, 3)]
    assert torch.autograd.gradcheck(acceleration._ConcatLinear.apply, (x, *weights))
    frozen = [w.detach() for w in weights]
    assert torch.autograd.gradcheck(acceleration._ConcatLinear.apply, (x, *frozen))

    layer = tiny_model(seed=8).model.layers[0].train()
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        h = torch.randn(1, 10, 48, requires_grad=True)
        cos, sin = modeling._rope_cos_sin(torch.arange(10)[None], 16, 1e11, h.dtype)
        out = layer(h, modeling.LayerInputs(cos, sin, FUSED, fused=True))
    mix, att, mlp = layer.mamba, layer.self_attn, layer.feed_forward
    fused_rows = sum(m.out_features for m in (mix.in_proj, att.q_proj, att.k_proj, att.v_proj))
    assert (mix.in_proj.out_features, 48) in shapes  # the weights are saved as themselves
    assert (fused_rows, 48) not in shapes and (2 * mlp.gate_proj.out_features, 48) not in shapes
    out.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_biases_hooks_and_caches_take_the_unfused_path(monkeypatch):
    """Biases do not commute with the moved multipliers (the input projections stay unfused with biases; the MLP
    fuses them); a module with forward hooks (DeepSpeed ZeRO-3 gathers weights in them) is run as itself; with a
    cache (decoding) nothing fuses. fp64, fused == unfused wherever it runs."""
    ours = tiny_model(seed=9, dtype=torch.float64, attention_bias=True, mamba_proj_bias=True, mlp_bias=True)
    ids = torch.randint(0, 97, (1, 15), generator=torch.Generator().manual_seed(6))
    calls = []
    ours.model.layers[1].feed_forward.up_proj.register_forward_pre_hook(lambda m, args: calls.append(1))
    results, counts = {}, {}
    for ops in (REFERENCE, FUSED):
        monkeypatch.setattr(modeling, "get_ops", lambda device, ops=ops: ops)
        with torch.no_grad(), CountGemms() as mode:
            results[ops.name] = ours(ids, use_cache=False).logits
        counts[ops.name] = mode.n
        with torch.no_grad(), CountGemms() as cached:
            ours(ids, use_cache=True)
        counts[ops.name + "+cache"] = cached.n
    assert rel_err(results["reference+fused"], results["reference"]) < 1e-12
    assert counts["reference"] - counts["reference+fused"] == 1  # layer 0's MLP only (biases fuse there)
    assert counts["reference+cache"] == counts["reference+fused+cache"] == counts["reference"]
    assert len(calls) == 4  # the hooked module ran itself every time
