"""A run killed at any moment resumes with `resume_from_checkpoint: latest` from the last complete checkpoint and
ends at the uninterrupted run's weights: killed (SIGKILL, in a subprocess) between steps under a cosine schedule
with warmup, and while a checkpoint is being written. Plus how checkpoints are judged complete."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.models import checkpoint_problems, resume_checkpoint
from align.validate import InputError
from tests.align.test_sft import _state, base, run_sft  # noqa: F401  (the tiny base checkpoint fixture)

ROOT = Path(__file__).resolve().parents[2]
# 7 steps, checkpoints at 3 and 6; the cosine schedule with 2 warmup steps changes the rate at every step, so a
# resume that restored the wrong step, schedule or optimizer state would end elsewhere
SCHEDULE = ["--max_steps", "7", "--learning_rate", "5e-3", "--lr_scheduler_type", "cosine", "--warmup_steps", "2"]
SAVES = ["--save_strategy", "steps", "--save_steps", "3"]


@pytest.fixture(scope="module")
def straight(base, tmp_path_factory):  # noqa: F811
    """The uninterrupted run's final weights."""
    return _state(run_sft(base, tmp_path_factory.mktemp("straight") / "run", *SCHEDULE, *SAVES).model)


def _killed(base, out, when):  # noqa: F811
    """Runs the same SFT in a subprocess that SIGKILLs itself at `when` (tests/align/killed_run.py)."""
    argv = [
        "--model_name_or_path",
        str(base / "base"),
        "--output_dir",
        str(out),
        "--sources",
        json.dumps([{"path": str(base / "mix.jsonl"), "language_column": "language"}]),
    ]
    from tests.align.test_sft import COMMON

    proc = subprocess.run(
        [sys.executable, "-m", "tests.align.killed_run", when, *argv, *COMMON, *SCHEDULE, *SAVES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def _resume_and_compare(base, out, straight, caplog):  # noqa: F811
    kept = (out / "checkpoint-3" / "trainer_state.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="falcon_align"):
        resumed = run_sft(base, out, *SCHEDULE, *SAVES, "--resume_from_checkpoint", "latest")
    assert resumed.state.global_step == 7
    # a fresh start would have ended at the same weights too, but saved checkpoint-3 again on its way
    assert (out / "checkpoint-3" / "trainer_state.json").stat().st_mtime_ns == kept
    got = _state(resumed.model)
    for name, want in straight.items():  # fp32 on CPU: the same arithmetic in the same order
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=name)
    return caplog.text


def test_killed_between_steps_resumes_to_the_uninterrupted_weights(base, straight, tmp_path, caplog):  # noqa: F811
    out = tmp_path / "run"
    _killed(base, out, "step:5")  # checkpoint-3 written, steps 4 and 5 lost
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    log = _resume_and_compare(base, out, straight, caplog)
    assert f"resuming from {out / 'checkpoint-3'} (step 3)" in log


def test_killed_while_saving_resumes_from_the_last_complete_checkpoint(base, straight, tmp_path, caplog):  # noqa: F811
    out = tmp_path / "run"
    _killed(base, out, "save:6")
    broken = out / "checkpoint-6"
    assert (broken / "model.safetensors").stat().st_size > 0 and (broken / "optimizer.pt").stat().st_size == 0
    assert not (broken / "trainer_state.json").exists()  # what the kill leaves: transformers would pick this one
    log = _resume_and_compare(base, out, straight, caplog)
    assert f"skipping incomplete checkpoint {broken}: no trainer_state.json" in log and "optimizer.pt is empty" in log
    assert f"resuming from {out / 'checkpoint-3'} (step 3)" in log
    assert not checkpoint_problems(broken)  # the resumed run wrote checkpoint-6 again, whole


def _checkpoint(folder: Path, step: int, damage=None) -> Path:
    """A small complete checkpoint (a valid file of each kind), then damaged: {file: None (removed) or a function
    of its bytes}."""
    from safetensors.torch import save_file

    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, path / "model.safetensors")
    torch.save({"state": {}}, path / "optimizer.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for name, change in (damage or {}).items():
        if change is None:
            (path / name).unlink()
        else:
            (path / name).write_bytes(change((path / name).read_bytes()))
    return path


@pytest.mark.parametrize(
    "damage, problem",
    [
        ({"trainer_state.json": None}, "no trainer_state.json"),
        ({"trainer_state.json": lambda b: b[:5]}, "trainer_state.json is cut short"),
        ({"optimizer.pt": lambda b: b""}, "optimizer.pt is empty"),
        ({"optimizer.pt": lambda b: b[: len(b) // 2]}, "optimizer.pt is cut short"),
        ({"model.safetensors": lambda b: b[: len(b) // 2]}, "model.safetensors is damaged"),
        ({"model.safetensors": None}, "no model weights"),
    ],
)
def test_latest_skips_each_kind_of_incomplete_checkpoint(tmp_path, caplog, damage, problem):
    good = _checkpoint(tmp_path, 2)
    bad = _checkpoint(tmp_path, 4, damage)
    assert checkpoint_problems(good) == [] and any(problem in p for p in checkpoint_problems(bad))
    with caplog.at_level(logging.INFO, logger="falcon_align"):
        assert resume_checkpoint("latest", tmp_path) == str(good)
    assert f"skipping incomplete checkpoint {bad}: " in caplog.text and problem in caplog.text


def test_latest_without_a_checkpoint_starts_fresh_and_says_so(tmp_path, caplog):
    _checkpoint(tmp_path, 3, {"trainer_state.json": None})
    for output_dir in (tmp_path, tmp_path / "never-made"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="falcon_align"):
            assert resume_checkpoint("latest", output_dir) is None
        assert f"no complete checkpoint in {output_dir}, training starts from step 0" in caplog.text


def test_an_explicit_checkpoint_must_exist_and_be_complete(tmp_path):
    with pytest.raises(InputError, match=r"resume_from_checkpoint: .*missing: no such checkpoint folder"):
        resume_checkpoint(str(tmp_path / "missing"), tmp_path)
    broken = _checkpoint(tmp_path, 5, {"optimizer.pt": lambda b: b""})
    with pytest.raises(InputError, match=r"checkpoint-5: incomplete checkpoint: optimizer.pt is empty"):
        resume_checkpoint(str(broken), tmp_path)
    assert resume_checkpoint(str(_checkpoint(tmp_path, 6)), tmp_path) == str(tmp_path / "checkpoint-6")
