"""A pytest plugin for `python -m bench gpu-tests`: each test's outcome appended to a JSON-lines file as it ends, so
a run stopped at its time budget still leaves a record of what finished (bench/gpu_tests.py builds it).

    pytest -p bench.gpu_progress --gpu-progress <file.jsonl> ...

Lines: {"collected": [node ids]} (the last one counts), {"started": node id, "at": unix time} as each test starts,
then {"nodeid", "when", "outcome", "duration", "message"} per test phase. Under pytest-xdist (`-n 4`: the GPU tests
are mostly compilation, which runs in parallel on the host's cores) the controller writes: it receives every worker's
starts, reports and collection.
"""

from __future__ import annotations

import json
import time

import pytest


def pytest_addoption(parser):
    parser.addoption("--gpu-progress", default=None, help="append each test's outcome to this JSON-lines file")


_path: str | None = None  # --gpu-progress of the running session


def pytest_configure(config):
    global _path
    _path = None if hasattr(config, "workerinput") else config.getoption("--gpu-progress")  # an xdist worker: None


def _write(record: dict) -> None:
    path = _path
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def pytest_collection_finish(session):
    if session.items:  # an xdist controller collects nothing itself
        _write({"collected": [item.nodeid for item in session.items]})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    _write({"collected": list(ids)})


def pytest_runtest_logstart(nodeid, location):  # under xdist the controller hears of each worker's starts
    _write({"started": nodeid, "at": round(time.time(), 1)})


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":  # setup/teardown only when they fail or skip
        _write({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                               "duration": round(report.duration, 3), "message": _message(report)[:300]})  # fmt: skip


def _message(report) -> str:
    """A skip's reason, or a failure's first line as pytest's JUnit report gives it ("AssertionError: ...")."""
    if report.outcome == "passed":
        return ""
    if report.skipped and isinstance(report.longrepr, tuple):  # (file, line, "Skipped: reason")
        return report.longrepr[2].removeprefix("Skipped: ")
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message.splitlines()[0]
    lines = report.longreprtext.strip().splitlines()
    return lines[-1] if lines else report.outcome
