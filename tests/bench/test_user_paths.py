"""bench/user_paths.py's pieces that run without a GPU: the reference's failure as a result, the step profile, the
timed span."""

import argparse
import time
from types import SimpleNamespace

import torch

from bench.common import SpanTimer
from bench.user_paths import ProfileSteps, Record


def test_a_failing_reference_is_recorded_and_the_run_goes_on(tmp_path):
    args = argparse.Namespace(preset="0.5b", out=str(tmp_path / "r.json"))
    record = Record(dict(card="cpu", command="c", commit="x"), args)
    row = record.row("align/dpo.py", tokens_per_s=1.0)
    record.emit(row)

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 18.00 GiB")

    record.reference(row, out_of_memory)
    assert row["reference_tokens_per_s"] is None
    assert row["reference_error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert "reference_error" in (tmp_path / "r.json").read_text()


def test_the_step_profile_covers_its_steps_and_counts_host_syncs():
    profile = ProfileSteps(first=2, n=2)
    x = torch.randn(64, 64)
    for step in range(5):  # the Trainer's global_step: k at step k's begin, k + 1 at its end
        profile.on_step_begin(None, SimpleNamespace(global_step=step), None)
        y = x @ x
        float(y.sum())  # one .item() a step: a host-device sync on a GPU
        profile.on_step_end(None, SimpleNamespace(global_step=step + 1), None)
    r = profile.result
    assert r["steps"] == 2 and r["wall_ms_per_step"] > 0
    assert r["syncs_per_step"] == {"aten::_local_scalar_dense": 1}
    assert any(op["kernel"] == "aten::mm" and op["calls_per_step"] == 1 for op in r["top_host_ops"])


def test_the_span_timer_counts_only_its_steps_tokens_and_time():
    timer = SpanTimer(first=2, last=4)
    seen = 0
    for step in range(6):  # steps 2 and 3 are timed; the others take no time and see 1000 tokens each
        state = SimpleNamespace(global_step=step, num_input_tokens_seen=seen)
        timer.on_step_begin(None, state, None)
        timed = 2 <= step < 4
        time.sleep(0.05 if timed else 0.0)
        seen += 100 if timed else 1000
        timer.on_step_end(None, SimpleNamespace(global_step=step + 1, num_input_tokens_seen=seen), None)
    assert timer.tokens == 200 and timer.steps == 2
    assert 0.1 <= timer.seconds < 0.5
    assert timer.tokens_per_s() == round(200 / timer.seconds, 1)
    assert timer.per_s(8) == round(16 / timer.seconds, 2)
