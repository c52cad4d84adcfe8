"""Per-sample verdicts as append-only JSONL (resumable), and the per-task summary (paper Table 2 shape).

A line: {"id", "task", "status", "verdict"|"score"|"reason", "output", "profile", "mode"}; status is
``judged``, ``unjudged`` (the judge could not answer — retried on the next run), ``missing``
(no output image for the sample) or ``bad_input`` (an unreadable image, named in "reason").
The last line for an id wins, so a rerun can turn an unjudged sample into a judged one.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from .edit_score import SCORE_ASPECTS
from .verdict import QUESTIONS

log = logging.getLogger(__name__)

STATUSES = ("judged", "unjudged", "missing", "bad_input")
# The paper's Table 2 column for each task.
TABLE2_COLUMNS = {"animal_scene": "Animal", "person_scene": "Person", "group_portrait": "Group",
                  "style_transfer": "Style", "clothing_replace": "Clothing"}


class VerdictLog:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def records(self) -> dict[str, dict]:
        """The latest record per sample id; a damaged line (a crash mid-write) is skipped with a warning."""
        latest: dict[str, dict] = {}
        if not self.path.exists():
            return latest
        with open(self.path) as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    latest[str(record["id"])] = record
                except (ValueError, KeyError, TypeError):
                    log.warning("%s:%d: skipping a damaged line (it will be judged again)", self.path, line_no)
        return latest

    def done_ids(self) -> set[str]:
        return {i for i, r in self.records().items() if r.get("status") == "judged"}

    def append(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock:
            needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
            with open(self.path, "a") as fh:
                fh.write(("\n" if needs_newline else "") + line)
                fh.flush()
                os.fsync(fh.fileno())  # a verdict we paid for survives a crash


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def summarize(records: dict[str, dict], mode: str, extra: dict | None = None) -> dict:
    """Means per task and overall; counts of each status. Score mode: SC, PQ, overall (0-10)."""
    fields = list(SCORE_ASPECTS) + ["overall"] if mode == "score" else list(QUESTIONS) + ["reward"]
    key = "score" if mode == "score" else "verdict"
    by_task: dict[str, list[dict]] = {}
    for record in records.values():
        by_task.setdefault(record.get("task") or "unknown", []).append(record)

    def block(rows):
        judged = [r[key] for r in rows if r.get("status") == "judged" and isinstance(r.get(key), dict)]
        out = {f"n_{s}": sum(r.get("status") == s for r in rows) for s in STATUSES}
        out.update({f: _mean(v[f] for v in judged) for f in fields})
        return out

    tasks = {task: block(rows) for task, rows in sorted(by_task.items())}
    summary = {"mode": mode, "tasks": tasks, "overall": block(list(records.values()))}
    headline = "overall" if mode == "score" else "reward"
    summary["table2"] = {TABLE2_COLUMNS.get(t, t): b[headline] for t, b in tasks.items()}
    summary.update(extra or {})
    return summary


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
