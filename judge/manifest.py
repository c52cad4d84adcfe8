"""The dataset manifest (DESIGN contract 5): JSONL, one sample a line, paths relative to it."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TASKS = ("animal_scene", "person_scene", "group_portrait", "style_transfer", "clothing_replace")
# Single-reference edits: the toy base's pretraining data and the Table-1 regression set.
SINGLE_TASKS = ("single_edit",)
SPLITS = ("train", "test")


class ManifestError(ValueError):
    """A bad manifest line, named by file and line number, with the reason and the fix."""

    def __init__(self, path, line_no: int, reason: str):
        super().__init__(f"{path}:{line_no}: {reason}")
        self.path, self.line_no, self.reason = str(path), line_no, reason


@dataclass
class Sample:
    id: str
    task: str
    images: list[str]  # one or two reference paths, relative to the manifest
    instruction: str
    target: str | None = None
    plan: dict | None = None
    split: str = "train"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def parse_line(text: str, path="<manifest>", line_no: int = 0) -> Sample:
    """Parse and check one line's shape (not the files it names)."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(path, line_no, f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(d, dict):
        raise ManifestError(path, line_no, "a line must be a JSON object")
    for key in ("id", "task", "images", "instruction"):
        if key not in d:
            raise ManifestError(path, line_no, f"missing field {key!r}")
    if d["task"] not in TASKS + SINGLE_TASKS:
        raise ManifestError(path, line_no, f"unknown task {d['task']!r}; use one of {', '.join(TASKS + SINGLE_TASKS)}")
    images = d["images"]
    if not isinstance(images, list) or not 1 <= len(images) <= 2 or not all(isinstance(p, str) and p for p in images):
        raise ManifestError(path, line_no, "'images' must be a list of one or two image paths")
    if not isinstance(d["instruction"], str) or not d["instruction"].strip():
        raise ManifestError(path, line_no, "'instruction' must be a non-empty string")
    split = d.get("split", "train")
    if split not in SPLITS:
        raise ManifestError(path, line_no, f"unknown split {split!r}; use 'train' or 'test'")
    target = d.get("target")
    if target is not None and not isinstance(target, str):
        raise ManifestError(path, line_no, "'target' must be a path or null")
    plan = d.get("plan")
    if plan is not None and not isinstance(plan, dict):
        raise ManifestError(path, line_no, "'plan' must be an object or null")
    return Sample(str(d["id"]), d["task"], images, d["instruction"], target, plan, split)


def write_manifest(path, samples) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(s.to_json() + "\n" for s in samples))
    tmp.replace(path)
