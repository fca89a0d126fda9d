"""Shared by the CPU test (tests/model/test_packing.py) and its GPU twin (tests/model/test_gpu.py)."""

import torch

from tests.conftest import rel_err, tiny_model


def check_segmented_scan(device, monkeypatch, tol, chunk: int = 8):
    """Long rows run the SSD scan in segments with state passing (FalconH1Mixer._scan). With the segment made
    tiny: logits and every gradient equal the one-piece scan, for one document and for packed documents that
    start exactly at a seam (2 chunks), inside a segment and cross a seam; a cached prefill continues exactly.
    Lengths scale with `chunk` (the GPU twin takes the chunk size whose Triton configs are already tuned)."""
    import model.mixers as mixers

    scanned = _count_scans(monkeypatch)  # the lengths each ssd_scan call got: proof that the rows were cut
    k = chunk // 8
    model = tiny_model(seed=6, mamba_chunk_size=chunk).to(device)
    gen = torch.Generator(device).manual_seed(3)
    ids = torch.randint(1, 97, (1, 52 * k), device=device, generator=gen)
    packed = torch.cat([torch.arange(n * k, device=device) for n in (16, 11, 25)])[None]  # starts at 0, 16k, 27k

    def run(position_ids):
        model.zero_grad()
        out = model(ids, position_ids=position_ids, labels=ids, return_logits=True)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    for position_ids in (None, packed):
        whole, whole_grads = run(position_ids)
        for segment in (16 * k, 20 * k):  # a multiple of the chunk size and not
            monkeypatch.setattr(mixers, "SCAN_SEGMENT_TOKENS", segment)
            scanned.clear()
            seg, seg_grads = run(position_ids)
            assert max(scanned) == segment and min(scanned) == 52 * k % segment, scanned  # the last segment
            monkeypatch.setattr(mixers, "SCAN_SEGMENT_TOKENS", 1 << 30)
            assert rel_err(seg, whole) < tol, (segment, position_ids is None)
            for name in whole_grads:
                assert rel_err(seg_grads[name], whole_grads[name]) < 10 * tol, name
    with torch.no_grad():
        monkeypatch.setattr(mixers, "SCAN_SEGMENT_TOKENS", 16 * k)
        cache = model(ids[:, : 40 * k], use_cache=True).past_key_values  # prefill in 3 segments
        step = model(ids[:, 40 * k : 40 * k + 1], past_key_values=cache).logits[:, -1]
        monkeypatch.setattr(mixers, "SCAN_SEGMENT_TOKENS", 1 << 30)
        full = model(ids[:, : 40 * k + 1]).logits[:, -1]
    assert rel_err(step, full) < tol


def _count_scans(monkeypatch) -> list[int]:
    """FalconH1Mixer._scan with its ops' ssd_scan wrapped: every call's row length appended to the returned list."""
    import dataclasses

    import model.mixers as mixers

    lengths, scan = [], mixers.FalconH1Mixer._scan

    def counting(self, ops, *args):
        def ssd_scan(x, *rest, **kw):
            lengths.append(x.shape[1])
            return ops.ssd_scan(x, *rest, **kw)

        return scan(self, dataclasses.replace(ops, ssd_scan=ssd_scan), *args)

    monkeypatch.setattr(mixers.FalconH1Mixer, "_scan", counting)
    return lengths
