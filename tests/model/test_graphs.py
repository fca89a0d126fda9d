"""Training graphs' padding rules on any device: the same layer calls run eagerly behind them (capture=False)."""

import dataclasses

import torch

from model import kernels
from model.graphs import TrainingGraphs
from model.kernels import ref
from tests.conftest import rel_err, tiny_model


def _loss_and_grads(model, ids, position_ids):
    model.zero_grad()
    loss = model(ids, labels=ids, position_ids=position_ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _packed(docs, seed):
    ids = torch.randint(1, 97, (1, sum(docs)), generator=torch.Generator().manual_seed(seed))
    return ids, torch.cat([torch.arange(n) for n in docs])[None]


def test_filler_document_leaves_loss_and_every_gradient_unchanged(monkeypatch):
    """A packed row shorter than the budget runs with a trailing filler document: loss and every gradient equal the
    row's own (fp32), and rows that exceed the tokens or the document slots fall back, counted by reason."""
    ops = dataclasses.replace(kernels.REFERENCE, varlen_for_packing=True)  # cu_seqlens as the CUDA path has them
    monkeypatch.setitem(kernels._chosen, "cpu", ops)
    model = tiny_model(seed=5).train()
    graphs = TrainingGraphs(model, 1, 64, max_docs=4, compile=False, mixer_streams=False, capture=False)
    rows = [_packed((20, 3, 22), seed=1), _packed((30, 34), seed=2)]  # 45 tokens + filler; exactly the budget
    plain = [_loss_and_grads(model, *row) for row in rows]
    model.model._training_graphs = graphs
    padded = [_loss_and_grads(model, *row) for row in rows]
    assert graphs.replayed == 2 and not graphs.eager
    for (loss, grads), (base_loss, base_grads) in zip(padded, plain):
        assert rel_err(loss, base_loss) < 1e-6
        for name, g in base_grads.items():
            assert rel_err(grads[name], g) < 1e-5, name
    assert torch.isfinite(torch.stack([g.abs().max() for g in padded[0][1].values()])).all()

    _loss_and_grads(model, *_packed((40, 30), seed=3))  # 70 tokens over the budget of 64
    _loss_and_grads(model, *_packed((10, 10, 10, 10), seed=4))  # 4 documents + the filler over 4 slots
    assert graphs.replayed == 2
    assert sorted(graphs.eager) == ["(1, 70) tokens over the budget of one row of 64", "5 documents over 4 slots"]


def test_documents_within_a_length_bound_split_the_filler(monkeypatch):
    """Captured with a bound on a document's length (DPO: max_length inside a budget of many sequences), a short row's
    filler is split into documents within the bound, as the varlen kernel requires; loss and every gradient stay the
    row's own. A row whose longest document passes the bound, or that needs more slots, runs eagerly, counted."""
    seen = []

    def bounded(q, k, v, cu_seqlens, max_len, scale):  # the varlen kernel's contract: no document over max_len
        seen.append(((cu_seqlens[1:] - cu_seqlens[:-1]).max().item(), max_len, cu_seqlens.numel() - 1))
        return ref.varlen_attention_ref(q, k, v, cu_seqlens, max_len, scale)

    ops = dataclasses.replace(kernels.REFERENCE, varlen_for_packing=True, varlen_attention=bounded)
    monkeypatch.setitem(kernels._chosen, "cpu", ops)
    model = tiny_model(seed=7).train()
    graphs = TrainingGraphs(model, 1, 96, max_docs=7, compile=False, mixer_streams=False, capture=False, max_doc_len=20)
    assert graphs.fillers(30) == 4 and graphs.fillers(96) == 0
    row = _packed((12, 18), seed=1)  # 30 tokens: 66 of filler in documents of 20, 20, 20 and 6
    base_loss, base_grads = _loss_and_grads(model, *row)
    model.model._training_graphs = graphs
    seen.clear()
    loss, grads = _loss_and_grads(model, *row)
    assert graphs.replayed == 1 and not graphs.eager
    assert seen and all(longest <= bound == 20 and docs == 7 for longest, bound, docs in seen)
    assert rel_err(loss, base_loss) < 1e-6
    for name, g in base_grads.items():
        assert rel_err(grads[name], g) < 1e-5, name

    _loss_and_grads(model, *_packed((25, 5), seed=2))  # a document of 25 tokens over the bound
    _loss_and_grads(model, *_packed((10, 10, 10, 10), seed=3))  # 40 tokens: 4 documents + 3 fillers fill 7 slots
    _loss_and_grads(model, *_packed((5, 5, 5, 5), seed=4))  # 20 tokens: 4 documents + 4 fillers over 7 slots
    assert graphs.replayed == 2
    assert sorted(graphs.eager) == ["8 documents over 7 slots", "a document of 25 tokens over the bound of 20"]
