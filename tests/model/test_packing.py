"""Packed / padding-free rows: each document sees only itself in the SSM scan, the conv window and attention."""

import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tests.conftest import rel_err, tiny_model


def _docs(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (n,), generator=gen).tolist() for n in lengths]


def _alone(model, doc):
    with torch.no_grad():
        return model(torch.tensor([doc])).logits[0]


def test_trl_padding_free_batch_equals_each_document_alone():
    model = tiny_model(seed=4, mamba_n_groups=2)
    docs = _docs([7, 12, 5, 9, 3, 14])
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collator([{"input_ids": d} for d in docs])
    assert {"position_ids", "cu_seq_lens_q", "seq_idx"} <= set(batch)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    starts = batch["cu_seq_lens_q"].tolist()
    for i, doc in enumerate(docs):
        assert rel_err(packed[starts[i] : starts[i + 1]], _alone(model, doc)) < 1e-5, i


def test_several_packed_rows_from_position_ids_only():
    """Rows of 2–3 documents each; only restarting position_ids mark the boundaries."""
    model = tiny_model(seed=5)
    rows = [_docs([6, 11], seed=1), _docs([4, 9, 4], seed=2), _docs([10, 7], seed=3)]
    ids = torch.tensor([sum(r, []) for r in rows])
    pos = torch.tensor([sum((list(range(len(d))) for d in r), []) for r in rows])
    with torch.no_grad():
        packed = model(ids, position_ids=pos).logits
    for b, row in enumerate(rows):
        start = 0
        for doc in row:
            assert rel_err(packed[b, start : start + len(doc)], _alone(model, doc)) < 1e-5
            start += len(doc)


def test_packing_without_boundaries_would_leak():
    """The isolation is real: without position_ids the second document's logits change."""
    model = tiny_model(seed=6)
    a, b = _docs([8, 8], seed=4)
    with torch.no_grad():
        leaked = model(torch.tensor([a + b])).logits[0, 8:]
    assert rel_err(leaked, _alone(model, b)) > 1e-3


def test_packed_loss_equals_per_document_losses():
    model = tiny_model(seed=7)
    docs = _docs([9, 6, 11], seed=5)
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collator([{"input_ids": d} for d in docs])
    with torch.no_grad():
        packed = model(**batch).loss
        total, count = 0.0, 0
        for d in docs:
            ids = torch.tensor([d])
            total += model(ids, labels=ids).loss.item() * (len(d) - 1)
            count += len(d) - 1
    assert abs(packed.item() - total / count) < 1e-5


def test_right_and_left_padding_are_exact():
    model = tiny_model(seed=8, mamba_n_groups=2)
    short, long = _docs([6, 10], seed=6)
    right = torch.tensor([short + [0] * 4, long])
    left = torch.tensor([[0] * 4 + short, long])
    m_right = torch.tensor([[1] * 6 + [0] * 4, [1] * 10])
    m_left = torch.tensor([[0] * 4 + [1] * 6, [1] * 10])
    ref_short, ref_long = _alone(model, short), _alone(model, long)
    with torch.no_grad():
        r = model(right, attention_mask=m_right).logits
        lft = model(left, attention_mask=m_left).logits
    assert rel_err(r[0, :6], ref_short) < 1e-5 and rel_err(r[1], ref_long) < 1e-5
    assert rel_err(lft[0, 4:], ref_short) < 1e-5 and rel_err(lft[1], ref_long) < 1e-5


def _padded(docs, side="right"):
    width = max(map(len, docs))
    ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, d in enumerate(docs):
        sl = slice(0, len(d)) if side == "right" else slice(width - len(d), width)
        ids[i, sl], mask[i, sl] = torch.tensor(d), 1
    return ids, mask


def test_padding_free_execution_of_a_padded_batch_is_exact():
    """set_padding_free: the real tokens of all rows run as one packed row; logits at real positions, the loss
    and every gradient equal the padded computation; pads come back as zeros and are never computed."""
    docs = _docs([9, 4, 13, 1, 7], seed=8)
    for side in ("right", "left"):
        ids, mask = _padded(docs, side)
        labels = ids.masked_fill(mask == 0, -100)
        results = []
        for padding_free in (False, True):
            model = tiny_model(seed=9, mamba_n_groups=2).set_padding_free(padding_free)
            out = model(ids, attention_mask=mask, labels=labels, return_logits=True)
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            results.append((out.logits.detach(), out.loss.detach(), grads))
        (logits, loss, grads), (logits_pf, loss_pf, grads_pf) = results
        real = mask.bool()
        assert rel_err(logits_pf[real], logits[real]) < 1e-5, side
        assert abs(loss_pf - loss) <= 1e-5 * abs(loss), side
        for name in grads:
            assert rel_err(grads_pf[name], grads[name]) < 1e-4, (side, name)
        hidden = model.model(ids, attention_mask=mask, use_cache=False).last_hidden_state
        assert hidden[~real].abs().max() == 0, "pads are not computed"


def test_padding_free_leaves_generation_alone():
    model = tiny_model(seed=10).set_padding_free(True).eval()
    ids, mask = _padded(_docs([5, 8], seed=9), side="left")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        ref = (
            tiny_model(seed=10)
            .eval()
            .generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        )
    assert torch.equal(out, ref)


def test_long_rows_scan_in_segments_exactly(monkeypatch):
    from tests.model.scan_segments import check_segmented_scan

    check_segmented_scan("cpu", monkeypatch, 1e-5)


def test_collator_boundaries_are_taken_without_deriving_them(monkeypatch):
    """With the varlen path (as on CUDA), a TRL padding-free row's `cu_seq_lens_q` and `max_length_q` are the kernel's
    boundaries as given: nothing is derived from seq_idx on the device, and the logits equal the derived ones'."""
    import dataclasses

    from model import kernels, modeling
    from model.kernels import ref

    seen = []

    def varlen(q, k, v, cu_seqlens, max_len, scale):
        seen.append((cu_seqlens.tolist(), max_len))
        return ref.varlen_attention_ref(q, k, v, cu_seqlens, max_len, scale)

    monkeypatch.setitem(
        kernels._chosen, "cpu", dataclasses.replace(kernels.REFERENCE, varlen_for_packing=True, varlen_attention=varlen)
    )
    model = tiny_model(seed=6)
    docs = _docs([7, 12, 5, 9])
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": d} for d in docs])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        derived = model(inputs["input_ids"], position_ids=inputs["position_ids"]).logits
    calls = []
    monkeypatch.setattr(modeling, "cu_seqlens_from_seq_idx", lambda *a: calls.append(a))
    seen.clear()
    with torch.no_grad():
        given = model(**inputs).logits
    assert not calls and seen and all(s == ([0, 7, 19, 24, 33], 12) for s in seen)
    assert rel_err(given, derived) < 1e-6
