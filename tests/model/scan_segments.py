"""Shared by the CPU test (tests/model/test_packing.py) and its GPU twin (tests/model/test_gpu.py)."""

import torch

from tests.conftest import rel_err, tiny_model


def check_segmented_scan(device, monkeypatch, tol):
    """Long rows run the SSD scan in segments with state passing (FalconH1Mixer._scan). With the segment made
    tiny: logits and every gradient equal the one-piece scan, for one document and for packed documents that
    start exactly at a seam (16), inside a segment and cross a seam; a cached prefill continues exactly."""
    import model.modeling as modeling

    model = tiny_model(seed=6, mamba_chunk_size=8).to(device)
    gen = torch.Generator(device).manual_seed(3)
    ids = torch.randint(1, 97, (1, 52), device=device, generator=gen)
    packed = torch.cat([torch.arange(n, device=device) for n in (16, 11, 25)])[None]  # starts at 0, 16, 27

    def run(position_ids):
        model.zero_grad()
        out = model(ids, position_ids=position_ids, labels=ids, return_logits=True)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    for position_ids in (None, packed):
        whole, whole_grads = run(position_ids)
        for segment in (16, 20):  # a multiple of the chunk size and not
            monkeypatch.setattr(modeling, "SCAN_SEGMENT_TOKENS", segment)
            seg, seg_grads = run(position_ids)
            monkeypatch.setattr(modeling, "SCAN_SEGMENT_TOKENS", 1 << 30)
            assert rel_err(seg, whole) < tol, (segment, position_ids is None)
            for name in whole_grads:
                assert rel_err(seg_grads[name], whole_grads[name]) < 10 * tol, name
    with torch.no_grad():
        monkeypatch.setattr(modeling, "SCAN_SEGMENT_TOKENS", 16)
        cache = model(ids[:, :40], use_cache=True).past_key_values  # prefill in 3 segments
        step = model(ids[:, 40:41], past_key_values=cache).logits[:, -1]
        monkeypatch.setattr(modeling, "SCAN_SEGMENT_TOKENS", 1 << 30)
        full = model(ids[:, :41]).logits[:, -1]
    assert rel_err(step, full) < tol
