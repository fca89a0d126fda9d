"""`python -m bench ssd-op` on CPU: the harness with the reference scan (always), and with our kernels against it in
Triton's interpreter where triton is installed (a subprocess: the interpreter is chosen when the kernels are defined;
tests/model/triton_interpreter.py patches it first).
The result carries the schema of bench/results/README.md and the two scans agree."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import ssd_op

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["--preset", "0.5b", "--seqs", "200", "--heads", "2", "--device", "cpu", "--iters", "1"]
SMOKE += ["--dtype", "float32", "--doc-tokens", "50"]


def _check_record(record: dict, providers: list[str]) -> None:
    assert record["card"] == "cpu" and record["command"].startswith("python -m bench ssd-op --preset 0.5b")
    assert record["shape"] == dict(H=2, P=64, G=1, N=128, chunk=128, dtype="float32", doc_tokens=50)
    assert [(r["provider"], r["seq"]) for r in record["rows"]] == [(p, 200) for p in providers]
    assert all(r["forward_us"] > 0 and r["forward_backward_us"] > 0 for r in record["rows"])


def test_ssd_op_bench_runs_the_reference_on_cpu(tmp_path):
    out = tmp_path / "ssd.json"
    record = ssd_op.main([*SMOKE, "--providers", "reference", "--kernels", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    _check_record(record, ["reference"])
    assert record["agreement"] == [] and record["speedup"] == {}
    kernels = record["rows"][0]["kernels"]  # on CPU the ops: the reference's einsums and exps among them
    assert 0 < len(kernels) <= 12 and all(k["us"] > 0 and k["calls"] >= 1 for k in kernels)
    assert [k["us"] for k in kernels] == sorted((k["us"] for k in kernels), reverse=True)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed: no interpreter")
def test_ssd_op_bench_runs_ours_in_the_interpreter(tmp_path):
    out = tmp_path / "ssd.json"
    site = str(Path(importlib.util.find_spec("triton").origin).parents[1])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([site, str(ROOT)]))
    argv = [*SMOKE, "--providers", "triton", "reference", "--out", str(out)]
    run = f"from tests.model.triton_interpreter import patch; patch(); from bench.__main__ import main; main({argv!r})"
    run = run.replace("main([", "main(['ssd-op', ", 1)
    done = subprocess.run([sys.executable, "-c", run], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    _check_record(record, ["triton", "reference"])
    (agreement,) = record["agreement"]
    assert agreement["provider"] == "reference" and agreement["against"] == "triton"
    assert agreement["y"] < 1e-5 and agreement["dx"] < 1e-5


def test_tune_knobs_are_the_kernels_settings_and_unknown_ones_are_named():
    from model.kernels import ssd

    knobs = dict(ssd_op.tune_knobs([]))
    assert set(ssd.CAPS) <= set(knobs) and all(f"num_warps:{k}" in knobs for k in ssd.LAUNCH)
    assert [k for k, _ in ssd_op.tune_knobs(["num_stages"])] == [
        f"num_stages:{k}" for k, v in ssd.LAUNCH.items() if "num_stages" in v
    ]
    with pytest.raises(SystemExit, match=r"unknown knob\(s\) \['warps'\]; choose from \['rows'"):
        ssd_op.tune_knobs(["warps"])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed: no interpreter")
def test_tune_sweeps_a_knob_and_keeps_what_computes_the_same(tmp_path):
    """`--tune rows` in the interpreter: each other choice of the cap timed once and compared with the starting
    settings (y and every gradient), the best kept, and the module's settings as they were (the record's start)."""
    from model.kernels import ssd

    out = tmp_path / "tune.json"
    site = str(Path(importlib.util.find_spec("triton").origin).parents[1])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([site, str(ROOT)]))
    argv = ["ssd-op", *SMOKE, "--providers", "triton", "--tune", "rows", "--out", str(out)]
    run = f"from tests.model.triton_interpreter import patch; patch(); from bench.__main__ import main; main({argv!r})"
    done = subprocess.run([sys.executable, "-c", run], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    tuned = json.loads(out.read_text())["tune"]
    assert tuned["seq"] == 200 and tuned["start"] == {"launch": ssd.LAUNCH, "caps": ssd.CAPS}
    others = [c for c in ssd_op.CAP_CHOICES["rows"] if c != ssd.CAPS["rows"]]
    assert [(t["knob"], t["value"]) for t in tuned["trials"]] == [("rows", c) for c in others]
    assert all(t["us"] > 0 and t["worst"] < 1e-6 for t in tuned["trials"]) and tuned["best_us"] <= tuned["start_us"]
    assert tuned["best"]["launch"] == ssd.LAUNCH and tuned["best"]["caps"]["rows"] in ssd_op.CAP_CHOICES["rows"]
    against = tuned["best_against_start"]
    assert set(against) == {"y", "dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias"} and max(against.values()) < 1e-6
