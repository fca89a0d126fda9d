"""The memory planner: its parameter count is the model's, it reproduces the measurement it was fitted to, and
it moves the right way with offload, LoRA and card size."""

import pytest
import torch

from model import FalconH1ForCausalLM, preset_config
from model.memory import _n_params, main, plan


@pytest.mark.parametrize("preset", ["0.5b", "1.5b-deep", "7b"])
def test_parameter_count_is_the_models(preset):
    cfg = preset_config(preset)
    with torch.device("meta"):
        real = sum(p.numel() for p in FalconH1ForCausalLM(cfg).parameters())
    assert abs(_n_params(cfg) - real) <= 1e-3 * real


def test_reproduces_the_committed_measurements_and_orders_settings():
    """The H100 points it was fitted to (bench/results/h100-*-long-*.json), and the others predicted at or above
    what was measured (an over-prediction wastes length; an under-prediction is an out-of-memory)."""
    cfg, big = preset_config("0.5b"), preset_config("7b")
    fitted = plan(cfg, card_gib=79, offload=True, seq=524288, scan_segment=None).peak_gib_at_seq  # before segments
    assert fitted == pytest.approx(38.47, rel=0.02)
    for seq, measured in ((131072, 40.99), (262144, 64.69)):  # 7B LoRA + offload, H100
        predicted = plan(big, "lora", card_gib=79, offload=True, seq=seq).peak_gib_at_seq
        assert measured <= predicted <= 1.15 * measured, seq
    for seq, measured in ((65536, 12.2), (131072, 21.4), (262144, 39.82)):  # 0.5B, no offload, H200
        predicted = plan(cfg, card_gib=139, seq=seq, scan_segment=None).peak_gib_at_seq
        assert measured <= predicted <= 1.2 * measured, seq
    # 7B LoRA + offload, the row over two H100s (bench/results/h100x2-7b-lora-cp-512k-2026-11-27.json)
    predicted = plan(big, "lora", card_gib=79, offload=True, seq=524288, context_parallel=2).peak_gib_at_seq
    assert 64.68 <= predicted <= 1.15 * 64.68
    two = plan(big, "lora", card_gib=79, offload=True, context_parallel=2).longest_tokens
    assert 524288 <= two < 2 * plan(big, "lora", card_gib=79, offload=True).longest_tokens
    h100 = plan(cfg, card_gib=79)
    assert plan(cfg, card_gib=79, offload=True).longest_tokens > 1.8 * h100.longest_tokens
    assert plan(big, "lora", card_gib=79).static_gib < plan(big, card_gib=79).static_gib / 3  # no grads, no AdamW
    assert plan(cfg, card_gib=139).longest_tokens > h100.longest_tokens
    assert plan(cfg, card_gib=79, precision="amp").longest_tokens < h100.longest_tokens
    with pytest.raises(ValueError, match="method"):
        plan(cfg, "qlora-typo")


def test_cli_prints_the_plan(capsys):
    main(["--preset", "7b", "--method", "lora", "--offload", "--seq", "262144"])
    out = capsys.readouterr().out
    assert "longest_tokens" in out and "peak_gib_at_seq" in out


def test_the_h100_out_of_memory_at_512k_is_predicted():
    """Measured 2026-11-26: 0.5B full fine-tune at 524,288 tokens, checkpointing, no offload: out of memory on an
    H100 80GB (79.2 GiB usable). The plan must not call it trainable."""
    assert plan(preset_config("0.5b"), card_gib=79.2, scan_segment=None).longest_tokens < 524288
