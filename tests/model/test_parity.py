"""Parity with transformers' FalconH1ForCausalLM on the same random weights, fp32.

Tolerances held: logits and loss within 1e-5 relative (max-abs error over max-abs reference), gradients of
every parameter within 1e-4 relative. The matrix covers all nine multipliers ≠ 1 (every config),
mamba_rms_norm true/false, n_groups 1/2, GQA and MHA, head_dim ≠ hidden/heads, tied/untied embeddings and
sequence lengths that are not multiples of the chunk size.
"""

import pytest
import torch

from tests.conftest import hf_twin, rel_err, tiny_model

CASES = {
    "rmsnorm-g1-gqa-hd16": dict(mamba_rms_norm=True, mamba_n_groups=1),
    "rmsnorm-g2": dict(mamba_rms_norm=True, mamba_n_groups=2),
    "no-rmsnorm-g2-tied": dict(mamba_rms_norm=False, mamba_n_groups=2, tie_word_embeddings=True),
    "no-rmsnorm-mha-hd8": dict(mamba_rms_norm=False, num_key_value_heads=4, head_dim=8),
    "norm-before-gate-3layers": dict(mamba_norm_before_gate=True, num_hidden_layers=3, mamba_d_conv=3),
}
LENGTHS = [1, 13, 21]  # chunk size is 8: none is a multiple


@pytest.mark.parametrize("name", CASES)
def test_logits_and_loss_match_transformers(name):
    ours = tiny_model(seed=1, **CASES[name])
    hf = hf_twin(ours)
    for length in LENGTHS:
        ids = torch.randint(0, ours.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            ref = hf(ids, labels=ids if length > 1 else None)
            got = ours(ids, labels=ids if length > 1 else None, return_logits=True)
        assert rel_err(got.logits, ref.logits) < 1e-5, (name, length)
        if length > 1:
            assert abs(got.loss.item() - ref.loss.item()) / ref.loss.item() < 1e-5


@pytest.mark.parametrize("name", ["rmsnorm-g2", "no-rmsnorm-g2-tied", "no-rmsnorm-mha-hd8"])
def test_gradients_match_transformers(name):
    ours = tiny_model(seed=2, **CASES[name])
    hf = hf_twin(ours)
    ids = torch.randint(0, ours.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    ours(ids, labels=ids).loss.backward()
    hf(ids, labels=ids).loss.backward()
    hf_params = dict(hf.named_parameters())
    checked = 0
    for pname, p in ours.named_parameters():
        g_ref = hf_params[pname].grad
        assert p.grad is not None and g_ref is not None, pname
        assert rel_err(p.grad, g_ref) < 1e-4, pname
        checked += 1
    assert checked == len(hf_params)


def test_padded_batch_matches_transformers_on_real_tokens():
    """Right and left padding with attention_mask: real positions equal HF's (explicit position ids to both)."""
    ours = tiny_model(seed=3, mamba_n_groups=2)
    hf = hf_twin(ours)
    ids = torch.randint(1, ours.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padded row
    mask[2, 9:] = 0  # right padded row
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert rel_err(got[real], ref[real]) < 1e-5
