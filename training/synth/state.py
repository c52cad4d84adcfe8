"""The run's append-only state: one JSON line per step of a pair; the last word on a key wins.

Stages: ``planned`` (instruction + plan), ``target`` (image written), then a final one: ``kept``,
``rejected`` (fewer yes answers than judge.min_yes) or ``failed`` (no acceptable plan). ``error`` and
``unjudged`` lines are notes, not final: the pair is taken up again on the next run from the
last stage it reached, so nothing paid for is asked again.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

FINAL = ("kept", "rejected", "failed")
PROGRESS = ("planned", "target")
NOTES = ("error", "unjudged")


class SynthState:
    def __init__(self, path):
        self.path = Path(path)
        self.pairs: dict[str, dict] = {}  # key -> merged record
        self.order: list[str] = []  # keys in first-seen order
        self._lock = threading.Lock()
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        lines = self.path.read_text().splitlines()
        for line_no, text in enumerate(lines, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                if line_no == len(lines):  # a line cut by an interrupted run: the step is redone
                    log.warning("%s: last line is incomplete (interrupted run); ignoring it", self.path)
                    continue
                raise ValueError(f"{self.path}:{line_no}: not valid JSON; fix or remove that line") from None
            self._merge(record)

    def _merge(self, record: dict) -> None:
        key = record["key"]
        if key not in self.pairs:
            self.pairs[key] = {}
            self.order.append(key)
        merged = self.pairs[key]
        stage = record.get("stage")
        if stage in NOTES:  # keep the stage reached; remember the note
            merged.setdefault("notes", []).append({k: record[k] for k in ("stage", "reason") if k in record})
            merged.update({k: v for k, v in record.items() if k not in ("stage", "reason", "time")})
            merged.setdefault("stage", None)
        else:
            merged.update(record)

    def append(self, key: str, stage: str, **fields) -> None:
        record = {"key": key, "stage": stage, "time": round(time.time(), 3), **fields}
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(line)
                f.flush()
            self._merge(record)

    def get(self, key: str) -> dict | None:
        with self._lock:
            record = self.pairs.get(key)
            return dict(record) if record else None

    def stage(self, key: str) -> str | None:
        with self._lock:
            return (self.pairs.get(key) or {}).get("stage")

    def is_final(self, key: str) -> bool:
        return self.stage(key) in FINAL

    def records(self, stage: str | None = None, task: str | None = None) -> list[dict]:
        with self._lock:
            out = [dict(self.pairs[k]) for k in self.order]
        return [r for r in out if (stage is None or r.get("stage") == stage) and (task is None or r.get("task") == task)]

    def pending(self, task: str) -> list[dict]:
        """Pairs of ``task`` that reached a stage but no final word (resumed first on a rerun)."""
        return [r for r in self.records(task=task) if r.get("stage") in PROGRESS]

    def count(self, stage: str, task: str) -> int:
        return len(self.records(stage, task))
