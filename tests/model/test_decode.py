"""The static-cache decode step (what `generate` captures in a CUDA graph on GPU) runs the model's own forward: on CPU,
without graphs, its logits equal the plain forward's at every step and its greedy tokens equal the eager path's, on
every parity config, a time-step limit included."""

import pytest
import torch

from model.cache import StaticHybridCache
from tests.conftest import rel_err, tiny_model
from tests.model.test_parity import CASES

CONFIGS = {**CASES, "time-step-limit": dict(time_step_limit=(0.05, 0.3), mamba_n_groups=2)}


def _ids(b, n, seed=0):
    return torch.randint(1, 97, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_static_cache_decode_equals_plain_forward(name):
    model = tiny_model(seed=21, **CONFIGS[name]).eval()
    ids = _ids(2, 19, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # row 0 left-padded
    cache = StaticHybridCache(model.config, 2, 32, "cpu", torch.float32)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits  # no cache: the training-style forward
        prefill = model(ids[:, :7], attention_mask=mask[:, :7], past_key_values=cache, use_cache=True).logits
        assert rel_err(prefill[1], full[1, :7]) < 1e-5 and rel_err(prefill[0, 4:], full[0, 4:7]) < 1e-5
        for t in range(7, 19):
            positions = (mask[:, : t + 1].cumsum(-1) - 1)[:, -1:]
            step = model(ids[:, t : t + 1], position_ids=positions, past_key_values=cache).logits[:, -1]
            assert rel_err(step, full[:, t]) < 1e-5, t
    assert cache.seen_tokens == 19 and int(cache.slot) == 19


def test_time_step_limit_changes_the_decode_step():
    """The limit reaches the single-token state update: without it the same weights decode differently."""
    ids = _ids(1, 12, seed=2)
    logits = []
    for limit in [(0.05, 0.3), (0.0, float("inf"))]:
        model = tiny_model(seed=22, time_step_limit=limit).eval()
        cache = StaticHybridCache(model.config, 1, 16, "cpu", torch.float32)
        with torch.no_grad():
            model(ids[:, :-1], past_key_values=cache, use_cache=True)
            logits.append(model(ids[:, -1:], past_key_values=cache).logits)
    assert rel_err(logits[0], logits[1]) > 1e-3


@pytest.mark.parametrize("name", ["rmsnorm-g2", "time-step-limit"])
def test_generate_on_static_cache_equals_eager_generate(name):
    """`generate` through the static cache (CPU: no graph) gives the eager path's greedy tokens, left padding and an
    end-of-sequence token included, and a reused cache gives them again."""
    model = tiny_model(seed=23, **CONFIGS[name]).eval()
    model.generation_config.pad_token_id = 0
    ids = _ids(3, 9, seed=3)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    eager = model.generate(ids, **kw)
    eos = int(eager[1, 12])  # a token row 1 emits mid-way: that row stops there, the others go on
    eager_eos = model.generate(ids, eos_token_id=eos, **kw)
    model.set_decode(static_cache=True, length_multiple=8)
    try:
        assert model.generate(ids, **kw).tolist() == eager.tolist()
        assert model.generate(ids, eos_token_id=eos, **kw).tolist() == eager_eos.tolist()
        assert len(model._static_caches._caches) == 1  # one cache, reused
    finally:
        model.set_decode(static_cache=None)


def test_static_cache_refuses_what_does_not_fit():
    model = tiny_model(seed=24).eval()
    cache = StaticHybridCache(model.config, 1, 8, "cpu", torch.float32)
    with torch.no_grad(), pytest.raises(ValueError, match="8"):
        model(_ids(1, 9), past_key_values=cache, use_cache=True)
