"""Hybrid cache: decoding step by step, chunked prefill and left-padded batched generation are exact."""

import torch

from model import FalconH1HybridCache
from tests.conftest import rel_err, tiny_model


def _ids(b, n, seed=0):
    return torch.randint(1, 97, (b, n), generator=torch.Generator().manual_seed(seed))


def test_cached_decoding_equals_full_forward_at_every_step():
    model = tiny_model(seed=9, mamba_n_groups=2)
    ids = _ids(2, 20)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :7], use_cache=True)
        cache = out.past_key_values
        assert rel_err(out.logits, full[:, :7]) < 1e-5
        for t in range(7, 20):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            assert rel_err(out.logits[:, -1], full[:, t]) < 1e-5, t


def test_chunked_prefill_equals_one_shot_prefill():
    """Multi-token forwards on a non-empty cache continue the SSM state and conv window (HF restarts them)."""
    model = tiny_model(seed=10)
    ids = _ids(2, 23, seed=1)
    with torch.no_grad():
        one_shot = model(ids, use_cache=True)
        cache = FalconH1HybridCache(model.config, 2)
        pieces = [
            model(ids[:, a:b], past_key_values=cache, use_cache=True).logits
            for a, b in [(0, 5), (5, 6), (6, 17), (17, 23)]
        ]
        assert rel_err(torch.cat(pieces, 1), one_shot.logits) < 1e-5
        for layer in range(model.config.num_hidden_layers):
            torch.testing.assert_close(cache.ssm_states[layer], one_shot.past_key_values.ssm_states[layer])
        nxt = _ids(2, 1, seed=2)
        a = model(nxt, past_key_values=cache).logits
        b = model(nxt, past_key_values=one_shot.past_key_values).logits
        assert rel_err(a, b) < 1e-5


def test_left_padding_leaves_last_token_logits_unchanged():
    model = tiny_model(seed=11)
    ids = _ids(1, 9, seed=3)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    with torch.no_grad():
        a = model(ids).logits[:, -1]
        b = model(padded, attention_mask=mask).logits[:, -1]
    assert rel_err(b, a) < 1e-5


def test_batched_generate_with_left_padding_equals_single_rows():
    model = tiny_model(seed=12)
    model.generation_config.pad_token_id = 0
    prompts = [_ids(1, 4, seed=4)[0], _ids(1, 9, seed=5)[0]]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = (torch.arange(width)[None] >= (width - torch.tensor([len(p) for p in prompts]))[:, None]).long()
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for i, p in enumerate(prompts):
        single = model.generate(
            p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=8, do_sample=False
        )
        assert batched[i, width:].tolist() == single[0, len(p) :].tolist()


def test_greedy_generate_equals_argmax_of_full_forward():
    model = tiny_model(seed=13)
    model.generation_config.pad_token_id = 0
    prompt = _ids(1, 6, seed=6)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert out.tolist() == seq.tolist()


def _top_p(logits, p):
    """(B, V) → the same logits with -inf outside the smallest most-likely set whose probability reaches p."""
    probs, order = logits.softmax(-1).sort(-1, descending=True)
    drop = probs.cumsum(-1) - probs >= p  # the mass before a token already reached p
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def test_sampling_generate_equals_sampling_the_full_forward_logits():
    """Batched, seeded nucleus sampling through the cache: at every step its scores are the uncached logits after
    temperature then top-p, and its tokens are what one multinomial draw over the batch on those gives with the same
    generator (a draw alone hardly notices a wrong logit: 8% off at every step can leave all 21 tokens unchanged)."""
    model = tiny_model(seed=14)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # every row runs all 7 steps
    ids = _ids(3, 5, seed=7)
    torch.manual_seed(0)
    out = model.generate(
        ids,
        max_new_tokens=7,
        do_sample=True,
        temperature=0.8,
        top_p=0.9,
        top_k=0,  # off (transformers would otherwise keep its default 50)
        output_scores=True,
        return_dict_in_generate=True,
    )
    torch.manual_seed(0)
    seq = ids
    with torch.no_grad():
        for step, scores in enumerate(out.scores):
            logits = _top_p(model(seq, use_cache=False).logits[:, -1] / 0.8, 0.9)
            kept = logits.isfinite()
            assert torch.equal(scores.isfinite(), kept) and rel_err(scores[kept], logits[kept]) < 1e-5, step
            seq = torch.cat([seq, torch.multinomial(logits.softmax(-1), 1)], 1)
    assert 0 < kept.sum() < kept.numel()  # top-p dropped some tokens and kept some
    assert out.sequences.shape == (3, 12) and out.sequences.tolist() == seq.tolist()


def test_ssm_state_is_fp32_in_a_bf16_model():
    model = tiny_model(seed=15, dtype=torch.bfloat16)
    with torch.no_grad():
        cache = model(_ids(1, 5, seed=8), use_cache=True).past_key_values
    assert all(s.dtype == torch.float32 for s in cache.ssm_states)
    assert cache.key_cache[0].dtype == torch.bfloat16


def test_cache_is_accepted_under_both_names():
    """transformers 5.24 renames past_key_values → cache; generate passes whichever it uses."""
    model = tiny_model(seed=16)
    ids = _ids(1, 8, seed=9)
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        a = model(ids[:, :7], use_cache=True)
        b = model(ids[:, 7:], cache=a.past_key_values).logits[:, -1]
    assert rel_err(b, full) < 1e-5
