"""The dataset manifest (DESIGN contract 5): JSONL, one sample a line, paths relative to it.

A line: ``id``, ``task``, ``images`` (reference paths: two or three for a dual-reference task, one for
``single_edit``; see :data:`REFERENCE_COUNTS`), ``instruction``, and optional
``target``, ``plan``, ``split`` (``train`` or ``test``) and ``sources``: where each image came from
and under which licence (synthesis writes it for every line; older manifests without it stay valid)::

    "sources": {"images": [{"source": "https://example.org/scenes", "licence": "CC-BY-4.0"},
                           {"source": "https://example.org/animals", "licence": "CC0-1.0"}],
                "target": {"source": "gpt-image-1", "licence": "unknown"}}

``sources.images`` is aligned with ``images`` (one entry each); ``sources.target`` (only with a
``target``, optional) is the generated target's: the image endpoint's model. Every entry has a
non-empty ``source`` and ``licence`` string.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TASKS = ("animal_scene", "person_scene", "group_portrait", "style_transfer", "clothing_replace")
# Single-reference edits: the toy base's pretraining data and the Table-1 regression set.
SINGLE_TASKS = ("single_edit",)
# Three-reference tasks (opt-in, never in a default task list): images 2 and 3 brought into image 1.
MULTI_TASKS = ("two_figures_scene",)
KNOWN_TASKS = TASKS + SINGLE_TASKS + MULTI_TASKS
MAX_REFERENCES = 3
# How many reference images a line of each task may have (inclusive range): any dual task takes 2-3
# (image 1 the one edited, the others brought in), the three-reference ones exactly 3.
REFERENCE_COUNTS = {**{t: (2, MAX_REFERENCES) for t in TASKS}, **{t: (1, 1) for t in SINGLE_TASKS},
                    **{t: (3, 3) for t in MULTI_TASKS}}
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
    images: list[str]  # reference paths (REFERENCE_COUNTS[task] of them), relative to the manifest
    instruction: str
    target: str | None = None
    plan: dict | None = None
    split: str = "train"
    sources: dict | None = None  # {"images": [{"source", "licence"}, ...], "target"?: {...}}; see above

    def to_json(self) -> str:
        d = asdict(self)
        if d["sources"] is None:  # left out: a manifest without provenance is written as before
            del d["sources"]
        return json.dumps(d, sort_keys=True)


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
    if d["task"] not in KNOWN_TASKS:
        raise ManifestError(path, line_no, f"unknown task {d['task']!r}; use one of {', '.join(KNOWN_TASKS)}")
    images = d["images"]
    if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
        raise ManifestError(path, line_no, "'images' must be a list of image paths (non-empty strings), "
                                           "one per reference")
    reason = image_count_problem(d["task"], len(images))
    if reason:
        raise ManifestError(path, line_no, reason)
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
    sources = d.get("sources")
    if sources is not None:
        reason = sources_problem(sources, len(images), target is not None)
        if reason:
            raise ManifestError(path, line_no, reason)
    return Sample(str(d["id"]), d["task"], images, d["instruction"], target, plan, split, sources)


def image_count_problem(task: str, count: int) -> str | None:
    """Why ``count`` reference images do not fit ``task`` (:data:`REFERENCE_COUNTS`), or None."""
    low, high = REFERENCE_COUNTS[task]
    if low <= count <= high:
        return None
    want = str(low) if low == high else f"{low} to {high}"
    kind = ("a single-reference task" if task in SINGLE_TASKS else
            "a three-reference task" if task in MULTI_TASKS else "a dual-reference task")
    return (f"'images' has {count} path(s) but {task} is {kind} and takes {want}: image 1 is the picture "
            "edited, the others what the instruction brings in; give one path per reference")


_SOURCES_FORM = ('write "sources": {"images": [{"source": ..., "licence": ...} per image], '
                 '"target": {"source": ..., "licence": ...}} (target optional)')


def sources_problem(sources, n_images: int, has_target: bool) -> str | None:
    """Why ``sources`` is not a valid provenance field for a line of ``n_images`` images, or None."""
    def entry_problem(entry, where):
        if not isinstance(entry, dict) or set(entry) != {"source", "licence"}:
            return f"{where} must be an object with exactly 'source' and 'licence'"
        if not all(isinstance(entry[k], str) and entry[k].strip() for k in ("source", "licence")):
            return f"{where}: 'source' and 'licence' must be non-empty strings"
        return None

    if not isinstance(sources, dict) or "images" not in sources or not set(sources) <= {"images", "target"}:
        return f"'sources' must be an object with 'images' and optionally 'target'; {_SOURCES_FORM}"
    entries = sources["images"]
    if not isinstance(entries, list) or len(entries) != n_images:
        return f"'sources.images' must have one entry per image ({n_images}); {_SOURCES_FORM}"
    problems = [entry_problem(e, f"sources.images[{k}]") for k, e in enumerate(entries)]
    if "target" in sources:
        if not has_target:
            return "'sources.target' is given but the line has no 'target'"
        problems.append(entry_problem(sources["target"], "sources.target"))
    return next((p for p in problems if p), None)


def write_manifest(path, samples) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(s.to_json() + "\n" for s in samples))
    tmp.replace(path)
