"""The GPU test record: the `gpu`-marked tests run under pytest, their JUnit XML and a one-screen summary (commit,
card, date, passed/failed/skipped per test) written to bench/results/.

    python -m bench gpu-tests                        # what `make gpu-test` runs
    python -m bench gpu-tests -k scan tests/model    # pytest arguments after the options narrow the run
    python -m bench gpu-tests --summarize <xml>      # the summary of an existing record, next to it
    python -m bench gpu-tests --budget 500           # stop at 500 s and record what finished
    python -m bench gpu-tests -n 4                   # four pytest-xdist workers: the compilations run in parallel

Files: <results>/<card>-gpu-tests-<date>.xml and .md (card as in the other result names: h100, h200, h100x2). The
XML carries the commit, card, date and command as properties of its test suite. Without a CUDA device nothing runs
and nothing is written (exit status 1).

With `--budget S` pytest is stopped after S seconds; the record is then built from the outcomes the run had
written as each test ended (bench/gpu_progress.py), and the tests it did not reach are listed as "not run". A run
stopped from outside (SIGTERM, as `timeout` sends) leaves its record the same way, and exits with status 143.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from bench.common import ROOT, git_commit

OUTCOMES = ("passed", "failed", "skipped", "not run")
NOT_RUN = "not-run"  # the <skipped type=...> of a test a budgeted run did not reach


def card_slug(name: str, count: int = 1) -> str:
    """'NVIDIA H100 80GB HBM3' → 'h100'; with several cards 'h100x2'."""
    words = [w for w in name.lower().replace("nvidia", "").split() if w]
    slug = re.sub(r"[^a-z0-9]+", "-", words[0] if words else "gpu").strip("-")
    return f"{slug}x{count}" if count > 1 else slug


def outcome(case: ET.Element) -> tuple[str, str]:
    """A JUnit testcase → (passed | failed | skipped | not run, the message's first line)."""
    for tag, kind in (("failure", "failed"), ("error", "failed"), ("skipped", "skipped")):
        found = case.find(tag)
        if found is not None:
            kind = "not run" if found.get("type") == NOT_RUN else kind
            message = (found.get("message") or found.text or tag).strip().splitlines()
            return kind, (message[0] if message else tag)[:110]
    return "passed", ""


def test_name(case: ET.Element) -> str:
    """The test function a case belongs to: module::name without its parameters."""
    return f"{case.get('classname') or '(collection)'}::{(case.get('name') or '').split('[')[0]}"


def tally(root: ET.Element) -> tuple[dict, list]:
    """→ ({test: {outcome: count}} in file order, [(outcome, case id, message) of every case not passed])."""
    per_test, notes = {}, []
    for case in root.iter("testcase"):
        kind, message = outcome(case)
        per_test.setdefault(test_name(case), defaultdict(int))[kind] += 1
        if kind != "passed":
            notes.append((kind, f"{case.get('classname')}::{case.get('name')}", message))
    return per_test, notes


def properties(root: ET.Element) -> dict:
    return {p.get("name"): p.get("value") for p in root.iter("property")}


def summary(xml_path: Path) -> str:
    """The one-screen Markdown summary of a JUnit XML record."""
    root = ET.parse(xml_path).getroot()
    per_test, notes = tally(root)
    totals = {k: sum(counts[k] for counts in per_test.values()) for k in OUTCOMES}
    info = properties(root)
    stopped = totals["not run"] > 0
    shown = OUTCOMES if stopped else OUTCOMES[:3]
    headline = ", ".join(f"{totals[k]} {k}" for k in shown)
    if stopped:
        # records from before the `stopped` property give only their budget
        reason = info.get("stopped") or f"the run stopped at its {info.get('budget', '?')} s budget"
        headline += f" ({reason})"
    lines = [
        f"# GPU tests: {headline}",
        "",
        f"commit {info.get('commit', '?')} · {info.get('card', '?')} · {info.get('date', '?')} · "
        f"{info.get('seconds', '?')} s · `{info.get('command', '?')}`",
        "",
        "| test | " + " | ".join(shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    lines += ["| " + " | ".join([name, *(str(c[k]) for k in shown)]) + " |" for name, c in per_test.items()]
    running = [note for note in notes if note[0] == "not run" and "still running" in note[2]]
    notes = [note for note in notes if note[0] != "not run"] + running
    if notes:
        lines += ["", "Not passed:", ""]
        lines += [f"- {kind}: `{case}`: {message}" for kind, case, message in notes]
    return "\n".join(lines) + "\n"


def add_properties(xml_path: Path, info: dict) -> None:
    """The run's commit, card, date and command as properties of each test suite (the host name dropped)."""
    tree = ET.parse(xml_path)
    for suite in tree.getroot().iter("testsuite"):
        suite.attrib.pop("hostname", None)
        props = suite.find("properties")
        if props is None:
            props = ET.Element("properties")
            suite.insert(0, props)
        for name, value in info.items():
            ET.SubElement(props, "property", name=name, value=str(value))
    tree.write(xml_path, encoding="utf-8", xml_declaration=True)


def write_summary(xml_path: Path) -> Path:
    md = xml_path.with_suffix(".md")
    md.write_text(summary(xml_path))
    return md


def cuda_card() -> tuple[str, int] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(), torch.cuda.device_count()


def run_tests(results: Path, pytest_args: list[str], commit: str | None, budget: float | None = None) -> int:
    found = cuda_card()
    if found is None:
        print("no CUDA device visible: the GPU tests did not run, and no record was written")
        return 1
    name, count = found
    date = datetime.date.today().isoformat()
    xml_path = results / f"{card_slug(name, count)}-gpu-tests-{date}.xml"
    progress = xml_path.with_suffix(".progress.jsonl")
    results.mkdir(parents=True, exist_ok=True)
    xml_path.unlink(missing_ok=True)
    progress.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rfEs"]
    command += ["-p", "bench.gpu_progress", f"--gpu-progress={progress}"]
    command += [f"--junitxml={xml_path}", *(pytest_args or ["tests"])]
    if budget:  # a test still running at half the budget dumps every thread's stack: where a slow or stuck one is
        command += ["-o", f"faulthandler_timeout={max(10, int(budget / 2))}"]
    start = time.perf_counter()
    stopped = None  # why pytest was stopped before it ended: the record then comes from its progress file
    try:
        rc = run_to_budget(command, budget)
    except subprocess.TimeoutExpired:
        rc, stopped = 1, f"the run stopped at its {budget:g} s budget"
    except Stopped:
        rc, stopped = 143, f"the run was stopped (SIGTERM) after {time.perf_counter() - start:.0f} s"
    if stopped:
        print(f"\n{stopped}: what finished is recorded")
        if progress.exists():
            xml_from_progress(progress, xml_path, stopped_at=time.time())
    progress.unlink(missing_ok=True)
    if not xml_path.exists():  # pytest stopped before collecting (a usage error), or the budget ran out before
        return rc or 1
    card = name if count == 1 else f"{count}x {name}"
    shown = "python -m bench gpu-tests " + shlex.join((["--budget", f"{budget:g}"] if budget else []) + pytest_args)
    info = dict(commit=commit or git_commit(), card=card, date=date, seconds=round(time.perf_counter() - start))
    if budget:
        info["budget"] = f"{budget:g}"
    if stopped:
        info["stopped"] = stopped
    add_properties(xml_path, {**info, "command": shown.strip()})
    md = write_summary(xml_path)
    print(f"\n{md.read_text()}\nwritten: {xml_path.relative_to(ROOT) if xml_path.is_relative_to(ROOT) else xml_path}, "
          f"{md.name}")  # fmt: skip
    return rc


class Stopped(Exception):
    """This process got SIGTERM (`timeout`, a scheduler) while pytest ran."""


def _stop(*_):
    raise Stopped


def run_to_budget(command: list[str], budget: float | None) -> int:
    """Run pytest in a process group of its own → its exit status; past `budget` seconds (TimeoutExpired), or when
    this process is stopped (Stopped), the whole group is killed: pytest-xdist's workers too, which would otherwise
    run on and share the GPU with whatever comes next."""
    proc = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, _stop)  # `timeout` stops us: the finally runs, then the record is built
    try:
        return proc.wait(timeout=budget)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def xml_from_progress(progress: Path, xml_path: Path, stopped_at: float | None = None) -> None:
    """A stopped run's JSON-lines progress (bench/gpu_progress.py) → JUnit XML like pytest's: a testcase per test
    that ended, with its failure or skip, and one `<skipped type="not-run">` per collected test that did not end,
    saying whether it was running when the run stopped (and for how long) or was never reached."""
    collected, reports, started = [], {}, {}
    for line in progress.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "collected" in record:
            collected = record["collected"]
        elif "started" in record:
            started[record["started"]] = record["at"]
        else:
            reports.setdefault(record["nodeid"], []).append(record)
    suite = ET.Element("testsuite", name="pytest")
    for nodeid in collected or list(reports):
        path, _, rest = nodeid.partition("::")
        *owners, name = rest.split("::")
        classname = ".".join([path.removesuffix(".py").replace("/", "."), *owners])
        phases = reports.get(nodeid, [])
        case = ET.SubElement(suite, "testcase", classname=classname, name=name)
        case.set("time", f"{sum(p['duration'] for p in phases):.3f}")
        failed = [p for p in phases if p["outcome"] == "failed"]
        skipped = [p for p in phases if p["outcome"] == "skipped"]
        if failed:
            tag = "failure" if failed[0]["when"] == "call" else "error"
            ET.SubElement(case, tag, message=failed[0]["message"])
        elif skipped:
            ET.SubElement(case, "skipped", type="pytest.skip", message=skipped[0]["message"])
        elif not any(p["when"] == "call" for p in phases):
            message = "not run: the run was stopped first"
            if nodeid in started:
                ran = f" after {stopped_at - started[nodeid]:.0f} s" if stopped_at else ""
                message = f"still running when the run was stopped{ran}"
            ET.SubElement(case, "skipped", type=NOT_RUN, message=message)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(xml_path, encoding="utf-8", xml_declaration=True)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench gpu-tests",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # pytest's own options pass through untouched
    )
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where the record is written")
    ap.add_argument("--summarize", default=None, help="only write (and print) the summary of this JUnit XML")
    ap.add_argument("--commit", default=None, help="the code's commit, where the copy has no git history")
    ap.add_argument("--budget", type=float, default=None, help="seconds: stop the tests then and record what finished")
    return ap


def main(argv: list[str]) -> None:
    args, pytest_args = parser().parse_known_args(argv)
    if args.summarize:
        print(write_summary(Path(args.summarize)).read_text())
        return
    raise SystemExit(run_tests(Path(args.results), pytest_args, args.commit, args.budget))
