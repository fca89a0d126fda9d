"""Training graphs' padding rules on any device: the same layer calls run eagerly behind them (capture=False)."""

import dataclasses

import torch

from model import kernels
from model.graphs import TrainingGraphLadder, TrainingGraphs
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


def _static_grad_callables(callables, sample_args, num_warmup_iters=3, pool=None):
    """`torch.cuda.make_graphed_callables`' contract on any device: each callable's backward hands its gradients back
    as views of static buffers that the next backward overwrites (what a replayed graph does), so autograd may adopt
    one as a parameter's `.grad`."""

    def graphed(call):
        params = tuple(call.parameters())
        static = {}

        class Replay(torch.autograd.Function):
            @staticmethod
            def forward(ctx, n, *tensors):
                ctx.n = n
                ctx.save_for_backward(*tensors[:n])
                with torch.no_grad():
                    return call(*tensors[:n])

            @staticmethod
            def backward(ctx, grad):
                args = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
                surface = [*args, *params]
                wanted = [t for t in surface if t.requires_grad]
                with torch.enable_grad():
                    found = iter(torch.autograd.grad(call(*args), wanted, grad, allow_unused=True))
                out = []
                for i, t in enumerate(surface):
                    g = next(found) if t.requires_grad else None
                    if g is not None:
                        static.setdefault(i, torch.empty_like(g)).copy_(g)  # the static buffer, overwritten
                        g = static[i].detach()
                    out.append(g)
                return (None, *out)

        return lambda *args: Replay.apply(len(args), *args, *params)

    return tuple(graphed(c) for c in callables)


def test_accumulated_gradients_survive_static_buffers(monkeypatch):
    """Gradient accumulation through captured layers: the replayed backward hands each parameter's gradient over as a
    view of a static buffer, which autograd adopts as `.grad` where there is none; the next micro-batch's replay would
    overwrite it and add itself twice. Adopted gradients are copied into memory of their own before the next replay
    (`AdoptedGrads`): three micro-batches summed equal the plain model's, every parameter, with one copy a step (none
    where a step is one micro-batch)."""
    ops = dataclasses.replace(kernels.REFERENCE, varlen_for_packing=True)
    monkeypatch.setitem(kernels._chosen, "cpu", ops)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", _static_grad_callables)
    model = tiny_model(seed=5).train()
    rows = [_packed((20, 3, 22), seed=1), _packed((30, 34), seed=2), _packed((9, 40), seed=3)]

    def accumulated(rows):
        model.zero_grad()  # set_to_none, as the Trainer does after each optimizer step
        for ids, pos in rows:
            model(ids, labels=ids, position_ids=pos).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = accumulated(rows)
    graphs = TrainingGraphs(model, 1, 64, max_docs=4, compile=False, mixer_streams=False)
    model.model._training_graphs = graphs
    copies = []
    copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda *a, **k: copies.append(1) or copy(*a, **k))
    captured = accumulated(rows)
    assert graphs.replayed == 3 and not graphs.eager and len(copies) == 1
    for name, g in plain.items():
        assert rel_err(captured[name], g) < 1e-5, name
    accumulated(rows[:1])
    accumulated(rows[1:2])
    assert len(copies) == 1  # one micro-batch a step: the optimizer reads the adopted gradients as they are


def test_ladder_replays_the_smallest_budget_that_holds_a_row(monkeypatch):
    """Several token budgets (DPO's varied pairs): each row replays the smallest rung that holds it, with the loss and
    every gradient of the row itself; a row no rung holds runs eagerly, counted by the largest rung's reason; the
    real and captured tokens are counted for the logs' fill."""
    ops = dataclasses.replace(kernels.REFERENCE, varlen_for_packing=True)
    monkeypatch.setitem(kernels._chosen, "cpu", ops)
    model = tiny_model(seed=5).train()
    rungs = [
        TrainingGraphs(model, 1, seqlen, max_docs=3 + -(-seqlen // 32), compile=False, mixer_streams=False,
                       capture=False, max_doc_len=32)
        for seqlen in (96, 32, 64)
    ]  # fmt: skip
    ladder = TrainingGraphLadder(rungs)
    assert ladder.settings["budgets"] == [32, 64, 96]
    rows = [_packed((20, 3), seed=1), _packed((30, 30), seed=2), _packed((31, 32, 20), seed=3)]  # 23, 60, 83 tokens
    plain = [_loss_and_grads(model, *row) for row in rows]
    model.model._training_graphs = ladder
    laddered = [_loss_and_grads(model, *row) for row in rows]
    assert ladder.replayed_at == {32: 1, 64: 1, 96: 1} and ladder.replayed == 3 and not ladder.eager
    assert (ladder.real_tokens, ladder.captured_tokens) == (23 + 60 + 83, 32 + 64 + 96)
    for (loss, grads), (base_loss, base_grads) in zip(laddered, plain):
        assert rel_err(loss, base_loss) < 1e-6
        for name, g in base_grads.items():
            assert rel_err(grads[name], g) < 1e-5, name

    _loss_and_grads(model, *_packed((30, 30, 30, 10), seed=4))  # 100 tokens over every budget
    assert ladder.replayed == 3 and ladder.eager == {"(1, 100) tokens over the budget of one row of 96": 1}
