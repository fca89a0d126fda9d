"""Training-side behaviour: gradient checkpointing, from-scratch init, a few optimizer steps learn."""

import torch

from model import FalconH1Config, FalconH1ForCausalLM
from tests.conftest import rel_err, tiny_kwargs, tiny_model


def _grads(model, ids, **kw):
    model.zero_grad()
    model(ids, labels=ids, **kw).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(seed=1, num_hidden_layers=3).train()
    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(0))
    plain = _grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    ckpt = _grads(model, ids)
    for name in plain:
        assert rel_err(ckpt[name], plain[name]) < 1e-6, name


def test_gradient_checkpointing_with_packed_rows_gives_each_documents_gradients():
    """Reentrant checkpointing recomputes each layer of a packed row (the first pass runs without autograd, the
    recompute with it) with its documents still kept apart: the loss and every gradient equal those of the documents
    run alone, unpacked and not checkpointed, weighted by their predicted tokens."""
    model = tiny_model(seed=2).train()
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 97, (1, n), generator=gen) for n in (8, 12)]
    model.zero_grad()
    alone = sum(model(d, labels=d).loss * (d.size(1) - 1) for d in docs) / sum(d.size(1) - 1 for d in docs)
    alone.backward()
    untouched = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not untouched, untouched
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    ids = torch.cat(docs, 1)
    pos = torch.cat([torch.arange(d.size(1)) for d in docs])[None]
    labels = ids.clone()
    labels[0, docs[0].size(1)] = -100  # the second document's first token: nothing of its own comes before it
    model.zero_grad()
    packed = model(ids, position_ids=pos, labels=labels).loss
    packed.backward()
    assert abs(packed.item() - alone.item()) < 1e-5
    for name, p in model.named_parameters():
        assert rel_err(p.grad, expected[name]) < 1e-5, name


def test_activation_offload_gives_the_same_gradients(monkeypatch):
    """enable_activation_offload: reentrant per-layer checkpointing whose saved layer inputs go through
    save_on_cpu's hooks (spied here; on a GPU they land in pinned host memory); gradients are unchanged."""
    saved = []

    class Spy(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory=False):
            super().__init__(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Spy)
    model = tiny_model(seed=3, num_hidden_layers=3).train()
    ids = torch.randint(1, 97, (1, 24), generator=torch.Generator().manual_seed(1))
    plain = _grads(model, ids)
    model.enable_activation_offload()
    offloaded = _grads(model, ids)
    layer_inputs = [s for s in saved if s == (1, 24, model.config.hidden_size)]
    assert len(layer_inputs) >= 3, saved  # every layer's input went through the offload hooks
    for name in plain:
        assert rel_err(offloaded[name], plain[name]) < 1e-6, name


def test_mlp_in_checkpointed_chunks_gives_the_same_gradients():
    """mlp_chunk_tokens (long rows): the MLP runs chunk by chunk, each under its own checkpoint, inside the layer's
    checkpoint; loss and every gradient equal the whole-row MLP, packed rows included."""
    model = tiny_model(seed=4, num_hidden_layers=2).train()
    ids = torch.randint(1, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([list(range(13)) + list(range(27))])
    plain = _grads(model, ids, position_ids=pos)
    widths = []  # MLP inputs while autograd records (the reentrant checkpoint's first pass runs without)

    def spy(module, args, output):
        if torch.is_grad_enabled():
            widths.append(args[0].size(1))

    hook = model.model.layers[0].feed_forward.register_forward_hook(spy)
    model.enable_activation_offload(mlp_chunk_tokens=16)
    chunked = _grads(model, ids, position_ids=pos)
    hook.remove()
    assert sorted(widths)[-3:] == [8, 16, 16] and max(widths) == 16, widths  # 40 = 16 + 16 + 8, never whole
    for name in plain:
        assert rel_err(chunked[name], plain[name]) < 1e-6, name
    model.enable_activation_offload(False)
    assert model.model.mlp_chunk_tokens is None


def test_from_scratch_init_matches_falcon_conventions():
    torch.manual_seed(0)
    model = FalconH1ForCausalLM(FalconH1Config(**tiny_kwargs()))
    mixer = model.model.layers[0].mamba
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1, 9, dtype=torch.float32)))
    assert torch.all(mixer.D == 1) and torch.all(mixer.dt_bias == 1)
    assert abs(model.lm_head.weight.std().item() - 0.02) < 0.005


def test_a_few_adamw_steps_reduce_the_loss_and_move_every_parameter():
    model = tiny_model(seed=3).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)  # no decay: only gradients move weights
    ids = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, unchanged
