"""On-disk answer cache: one small JSON file per (images, instruction, question, model, mode, prompt version).

Writes go to a unique temporary file in the same folder and are renamed into place, so readers in
other threads or processes see either nothing or a whole entry. Entries hold answers and token
counts only — never a key or a URL's credentials.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


def cache_key(**fields) -> str:
    """A stable hash of the fields that decide the answer (sorted JSON, so order does not matter)."""
    blob = json.dumps({"format": CACHE_FORMAT, **fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class AnswerCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        try:
            entry = json.loads(path.read_text())
        except FileNotFoundError:
            entry = None
        except (OSError, ValueError) as e:  # a damaged file is a miss, and gets rewritten
            log.warning("judge cache: ignoring unreadable entry %s (%s)", path, e)
            entry = None
        with self._lock:
            if entry is None:
                self.misses += 1
            else:
                self.hits += 1
        return entry

    def put(self, key: str, entry: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{key}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "w") as fh:
                json.dump(entry, fh, sort_keys=True)  # no fsync: a torn entry after a crash reads as a miss
            os.replace(tmp, path)  # atomic on POSIX and Windows
        except OSError as e:  # a full disk must not lose the verdict we already have
            log.warning("judge cache: could not write %s (%s)", path, e)
            try:
                tmp.unlink()
            except OSError:
                pass
