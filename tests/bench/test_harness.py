"""The benchmark harness on CPU: `python -m bench --help` lists every benchmark and each one answers its own --help;
bench/results/README.md documents every result kind and the envelope the code writes; result names follow the rule
and the docs link to files that exist; the GPU test record's summary counts each outcome."""

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
# every benchmark is also a result kind of bench/results/README.md
BENCHMARKS = ["train", "decode", "dpo", "grpo", "long", "profile", "streams", "ssd-op", "user-paths", "fsdp-sft",
              "gpu-tests"]  # fmt: skip


def test_help_lists_every_benchmark():
    done = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    listed = re.findall(r"^ {4}(\S+)", done.stdout, flags=re.M)
    assert listed == BENCHMARKS


def test_an_unknown_benchmark_is_an_error_naming_it():
    done = subprocess.run([sys.executable, "-m", "bench", "trian"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice: 'trian'" in done.stderr


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_each_benchmark_answers_its_help(benchmark, capsys):
    from bench.__main__ import main

    with pytest.raises(SystemExit) as stop:
        main([benchmark, "--help"])
    assert stop.value.code == 0
    assert f"usage: python -m bench {benchmark}" in capsys.readouterr().out


def _readme_sections() -> dict[str, str]:
    text = (RESULTS / "README.md").read_text()
    parts = re.split(r"^### `([^`]+)`$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_results_readme_documents_every_result_kind():
    sections = _readme_sections()
    assert list(sections) == BENCHMARKS
    for kind, body in sections.items():
        assert f"python -m bench {kind}" in body, kind
        assert "| field | meaning |" in body or kind == "gpu-tests", kind  # the GPU record is JUnit XML


def test_results_readme_lists_the_envelope_the_code_writes():
    from bench.common import envelope

    text = (RESULTS / "README.md").read_text()
    table = text.split("## The envelope")[1].split("\n\n")[1]
    documented = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    args = argparse.Namespace(commit="abc1234")
    record = envelope("n", "train", ["--preset", "0.5b", "--commit", "abc1234"], args)
    assert documented == list(record)
    assert record["commit"] == "abc1234" and record["command"] == "python -m bench train --preset 0.5b"
    assert set(record["settings"]) == {"kernels", "fused_projections", "mixer_streams", "ssd_recompute",
                                       "compile_backend", "compile_loss"}  # fmt: skip


NAME = re.compile(r"^(h100|h200)(x\d+)?-[a-z0-9.]+(-[a-z0-9.]+)*-\d{4}-\d{2}-\d{2}\.(json|xml|md)$")


def test_result_files_are_named_for_what_they_measured():
    names = [p.name for p in RESULTS.iterdir() if p.name != "README.md"]
    assert names and [n for n in names if not NAME.match(n)] == []
    assert [n for n in names if re.search(r"-(final|before|new|old)-", n)] == []


def test_docs_link_only_to_result_files_that_exist():
    docs = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    linked = {m for doc in docs for m in re.findall(r"bench/results/([\w.-]+\.json)", doc.read_text())}
    assert linked and sorted(n for n in linked if not (RESULTS / n).exists()) == []


def test_docs_print_harness_commands_only():
    """Every benchmark command in docs/performance.md goes through `python -m bench` (or torchrun -m bench)."""
    text = (ROOT / "docs" / "performance.md").read_text()
    scripts = re.findall(r"(?:python3?|bash|torchrun[^\n`]*?) (bench/[\w/]+\.(?:py|sh))", text)
    assert set(scripts) <= {"bench/run_on_gpu.sh"}
    commands = re.findall(r"^ *(?:python3?|torchrun) [^\n]*", text, flags=re.M)
    assert len(commands) > 20
    assert [c for c in commands if " -m bench " not in c and " -m model.memory " not in c] == []


def test_command_line_drops_commit_in_both_spellings():
    from bench.common import command_line

    argv = ["generate", "--commit", "abc", "--preset", "0.5b", "--commit=def", "--out", "x y.json"]
    assert command_line("user-paths", argv) == "python -m bench user-paths generate --preset 0.5b --out 'x y.json'"


def test_card_names_become_file_name_prefixes():
    from bench.gpu_tests import card_slug

    assert card_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert card_slug("NVIDIA H200", 2) == "h200x2"


GPU_TESTS = """
import pytest


@pytest.mark.gpu
@pytest.mark.parametrize("x", [1, 2])
def test_fast_op(x):
    assert x


@pytest.mark.gpu
@pytest.mark.parametrize("x", [1, 2])
def test_graphs(x):
    assert x == 1, "graphs differ"


@pytest.mark.gpu
def test_two_gpus():
    pytest.skip("needs two GPUs")


def test_cpu_only():
    assert True
"""


def test_gpu_test_record_counts_each_outcome_per_test(tmp_path, monkeypatch):
    """The record of a run with passes, a failure and a skip: XML with the run's properties, and a summary line per
    test function; tests without the gpu marker are not in it."""
    from bench import gpu_tests

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test_fake_gpu.py").write_text(GPU_TESTS)
    monkeypatch.setattr(gpu_tests, "cuda_card", lambda: ("NVIDIA H100 80GB HBM3", 1))
    rc = gpu_tests.run_tests(tmp_path / "results", [str(tmp_path / "t")], commit="abc1234")
    assert rc == 1  # a test failed
    (xml,) = (tmp_path / "results").glob("h100-gpu-tests-*.xml")
    md = xml.with_suffix(".md").read_text()
    assert md.startswith("# GPU tests: 3 passed, 1 failed, 1 skipped\n")
    assert re.search(r"^commit abc1234 · NVIDIA H100 80GB HBM3 · \d{4}-\d{2}-\d{2} · \d+ s", md, flags=re.M)
    rows = re.findall(r"^\| (\S+) \| (\d+) \| (\d+) \| (\d+) \|$", md, flags=re.M)
    assert rows == [
        ("test_fake_gpu::test_fast_op", "2", "0", "0"),
        ("test_fake_gpu::test_graphs", "1", "1", "0"),
        ("test_fake_gpu::test_two_gpus", "0", "0", "1"),
    ]
    assert "- failed: `test_fake_gpu::test_graphs[2]`: AssertionError: graphs differ" in md
    assert "- skipped: `test_fake_gpu::test_two_gpus`: needs two GPUs" in md
    props = gpu_tests.properties(gpu_tests.ET.parse(xml).getroot())
    assert props["commit"] == "abc1234" and props["card"] == "NVIDIA H100 80GB HBM3"


SLOW_GPU_TESTS = """
import os
import time

import pytest


@pytest.mark.gpu
def test_quick():
    assert True


@pytest.mark.gpu
def test_fails():
    assert 1 == 2, "ours differs"


@pytest.mark.gpu
def test_never_ends():
    with open(os.environ["NEVER_ENDS_PID"], "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


@pytest.mark.gpu
def test_after():
    assert True
"""


@pytest.mark.parametrize("workers", [[], ["-n", "2", "--dist", "loadfile"]], ids=["one-process", "xdist"])
def test_gpu_tests_stopped_at_their_budget_still_leave_a_record(tmp_path, monkeypatch, workers):
    """--budget: pytest is stopped mid-run; the record holds the tests that ended (passed, failed) and lists the one
    it was in and the one after as not run. Under pytest-xdist (one file, one worker: the same order) the controller
    writes the record."""
    from bench import gpu_tests

    if workers:
        pytest.importorskip("xdist")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test_slow_gpu.py").write_text(SLOW_GPU_TESTS)
    monkeypatch.setattr(gpu_tests, "cuda_card", lambda: ("NVIDIA H200", 1))
    monkeypatch.setenv("NEVER_ENDS_PID", str(tmp_path / "pid"))
    rc = gpu_tests.run_tests(tmp_path / "results", [str(tmp_path / "t"), *workers], commit="abc1234", budget=15)
    sleeper = int((tmp_path / "pid").read_text())  # the test process it was in (an xdist worker, or pytest): gone
    assert _ended(sleeper, within=5.0)
    assert rc == 1
    (xml,) = (tmp_path / "results").glob("h200-gpu-tests-*.xml")
    assert not list((tmp_path / "results").glob("*.jsonl"))
    md = xml.with_suffix(".md").read_text()
    assert md.startswith("# GPU tests: 1 passed, 1 failed, 0 skipped, 2 not run (the run stopped at its 15 s budget)\n")
    rows = re.findall(r"^\| (\S+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", md, flags=re.M)
    names = [name.split("::")[-1] for name, *_ in rows]
    assert names == ["test_quick", "test_fails", "test_never_ends", "test_after"]
    assert [tuple(counts) for _, *counts in rows] == [
        ("1", "0", "0", "0"),
        ("0", "1", "0", "0"),
        ("0", "0", "0", "1"),
        ("0", "0", "0", "1"),
    ]
    assert "ours differs" in md and "`python -m bench gpu-tests --budget 15 " in md
    # the test it was in is named with how long it had run; the stack dump at half the budget says where it was
    (running,) = re.findall(r"^- not run: `(\S+)`: still running when the run was stopped after (\d+) s$", md, re.M)
    assert running[0].endswith("::test_never_ends") and 8 <= int(running[1]) <= 16


def test_gpu_tests_stopped_by_sigterm_still_leave_a_record(tmp_path, monkeypatch):
    """SIGTERM (what `timeout` sends) mid-run: pytest's process group is killed and the record is written from what
    had finished, saying how the run was stopped; the exit status is 143."""
    from bench import gpu_tests

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test_slow_gpu.py").write_text(SLOW_GPU_TESTS)
    monkeypatch.setattr(gpu_tests, "cuda_card", lambda: ("NVIDIA H100 80GB HBM3", 1))
    monkeypatch.setenv("NEVER_ENDS_PID", str(tmp_path / "pid"))
    term = threading.Timer(12, os.kill, (os.getpid(), signal.SIGTERM))  # the handler runs in this (main) thread
    term.start()
    try:
        rc = gpu_tests.run_tests(tmp_path / "results", [str(tmp_path / "t")], commit="abc1234")
    finally:
        term.cancel()
    assert rc == 143
    assert _ended(int((tmp_path / "pid").read_text()), within=5.0)
    (xml,) = (tmp_path / "results").glob("h100-gpu-tests-*.xml")
    md = xml.with_suffix(".md").read_text()
    assert re.match(
        r"# GPU tests: 1 passed, 1 failed, 0 skipped, 2 not run \(the run was stopped \(SIGTERM\) after 1\d s\)\n", md
    )
    assert not list((tmp_path / "results").glob("*.jsonl"))
    assert signal.getsignal(signal.SIGTERM) is not gpu_tests._stop  # the previous handler is back


def _ended(pid: int, within: float) -> bool:
    """Whether process `pid` ends (or is a zombie left to be reaped) within `within` seconds."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_gpu_tests_without_cuda_say_so_and_write_nothing(tmp_path, monkeypatch, capsys):
    import torch

    from bench import gpu_tests

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        gpu_tests.main(["--results", str(tmp_path / "results")])
    assert stop.value.code == 1 and "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "results").exists()


def test_fsdp_sft_reads_the_trainers_log_lines():
    from bench.fsdp_sft import summarise, trainer_logs

    text = """noise {'loss': 10.42, 'grad_norm': 2.75, 'learning_rate': 0.0, 'num_tokens': 4056.0, 'epoch': 0.1}
{'loss': '10.39', 'grad_norm': '2.781', 'num_tokens': '8109', 'epoch': '0.2'}
{'train_runtime': 9.5, 'train_loss': 10.41}"""
    got = summarise(0, trainer_logs(text))
    assert got == dict(rc=0, losses=[10.42, 10.39], grad_norms=[2.75, 2.781], num_tokens=[4056, 8109],
                       train_loss=10.41)  # fmt: skip


def test_user_paths_write_each_row_as_it_is_measured(tmp_path):
    """A user-path run stopped at its time limit leaves our side's figure in --out before the reference runs."""
    import json
    from types import SimpleNamespace

    from bench.user_paths import Record

    out = tmp_path / "r.json"
    record = Record({"card": "c", "command": "cmd", "commit": "abc"}, SimpleNamespace(preset="0.5b", out=str(out)))
    row = record.row("align/sft.py", seq=8192, tokens_per_s=70_000.0)
    record.emit(row)
    assert json.loads(out.read_text())["user_paths"] == [row]
    row["reference_tokens_per_s"] = 20_000.0
    record.emit(row)
    written = json.loads(out.read_text())["user_paths"]
    assert len(written) == 1 and written[0]["reference_tokens_per_s"] == 20_000.0 and written[0]["commit"] == "abc"
