"""pytest plugin for .ci/run: counts the tests marked ``host`` that really ran.

Loaded with ``-p host_count`` (``.ci`` on PYTHONPATH). A host test "ran" when its body was called
(passed or failed); one skipped (no ComfyUI host found, or skipped inside) does not count. The counts are
printed at the end of the run and, when ``DUALREF_HOST_COUNT`` names a file, written there as JSON.
"""
from __future__ import annotations

import json
import os

_counts = {"ran": 0, "skipped": 0}


def pytest_runtest_logreport(report):
    if "host" not in report.keywords:
        return
    if report.skipped:
        _counts["skipped"] += 1
    elif report.when == "call":
        _counts["ran"] += 1


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"host tests: {_counts['ran']} ran, {_counts['skipped']} skipped")
    path = os.environ.get("DUALREF_HOST_COUNT")
    if path:
        with open(path, "w") as f:
            json.dump(_counts, f)
