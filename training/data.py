"""Training data: a checked manifest, image sizes and aspect-ratio buckets, deterministic batches.

- :func:`read_manifest` checks every line (shape via ``judge.manifest.parse_line``, then the files:
  missing, unreadable, no target) and returns the good records and the bad lines with reasons.
- :func:`load_manifest` is what the trainer calls: without ``skip_bad`` the first problem stops it
  with the full list of bad lines; with it, bad lines are skipped, and :func:`write_skipped` lists
  every one (all splits, and images that failed to encode) in the run's ``skipped.jsonl``.
- :func:`fit_size` keeps each image's own aspect ratio (DESIGN contract 1); batches only group
  samples whose (target, ref1, ref2) latent shapes are equal (:class:`BucketBatches`).
"""
from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from judge.manifest import ManifestError, Sample, parse_line

from .files import write_text

log = logging.getLogger(__name__)


@dataclass
class Record:
    """One good manifest line: the sample with its files resolved."""

    line_no: int
    sample: Sample
    refs: list[Path]
    target: Path | None


@dataclass
class BadLine:
    line_no: int
    reason: str
    text: str

    def to_json(self) -> str:
        return json.dumps({"line": self.line_no, "reason": self.reason, "text": self.text[:2000]})


class BadManifestError(ManifestError):
    """Bad lines in a manifest; the message lists every one by line number and reason."""

    def __init__(self, path, bad: list[BadLine], total: int):
        self.bad, self.total = bad, total
        head = "\n".join(f"  line {b.line_no}: {b.reason}" for b in bad[:50])
        more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
        reason = (f"{len(bad)} of {total} lines are bad:\n{head}{more}\n"
                  "Fix the lines, or pass --skip-bad (data.skip_bad=true) to train on the rest")
        super().__init__(path, bad[0].line_no, reason)


@dataclass
class ManifestReport:
    path: Path
    records: list[Record]
    bad: list[BadLine]
    total: int

    def raise_if_bad(self) -> None:
        if self.bad:
            raise BadManifestError(self.path, self.bad, self.total)



def check_image(path: Path) -> str | None:
    """None if ``path`` is a readable image, else the reason (header and integrity check, no decode)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return "not found"
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"unreadable image ({type(e).__name__}: {e})"
    return None


def read_manifest(path, *, require_target: bool = True, tasks=None, split: str | None = None,
                  check_files: bool = True) -> ManifestReport:
    """Check every line of the manifest at ``path``; lines of other tasks/splits are left out, not bad."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ManifestError(path, 0, f"cannot read the manifest ({e.strerror})") from None
    root = path.parent
    records, bad, seen, total = [], [], {}, 0
    for line_no, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        total += 1
        try:
            sample = parse_line(text, path, line_no)
        except ManifestError as e:
            bad.append(BadLine(line_no, e.reason, text))
            continue
        if (tasks and sample.task not in tasks) or (split and sample.split != split):
            continue
        problems = []
        if sample.id in seen:
            problems.append(f"duplicate id {sample.id!r} (first on line {seen[sample.id]})")
        seen.setdefault(sample.id, line_no)
        if require_target and sample.target is None:
            problems.append("no target image (training needs 'target')")
        named = [(f"images[{k}]", p) for k, p in enumerate(sample.images)]
        if sample.target is not None:
            named.append(("target", sample.target))
        if check_files:
            for field_name, rel in named:
                reason = check_image(root / rel)
                if reason:
                    problems.append(f"{field_name} {rel!r}: {reason} ({root / rel})")
        if problems:
            bad.append(BadLine(line_no, "; ".join(problems), text))
            continue
        target = root / sample.target if sample.target is not None else None
        records.append(Record(line_no, sample, [root / p for p in sample.images], target))
    return ManifestReport(path, records, bad, total)


def load_manifest(path, *, skip_bad: bool = False, skipped: list | None = None, **kwargs) -> list[Record]:
    """The good records; bad lines stop the run (listing all) unless ``skip_bad``, which leaves them
    out and adds them to ``skipped`` (the run writes every pass's list at once: :func:`write_skipped`)."""
    report = read_manifest(path, **kwargs)
    if report.bad and not skip_bad:
        report.raise_if_bad()
    if report.bad:
        log.warning("skipping %d bad manifest line(s) of %s", len(report.bad), path)
        if skipped is not None:  # before a split without records raises below: its bad lines count too
            skipped.extend(report.bad)
    if not report.records:
        raise ManifestError(path, 0, "no usable samples (check data.tasks / data.split and the lines above)")
    return report.records


def write_skipped(run_dir, manifest, skipped) -> Path | None:
    """Every line a run skipped -- from every split's manifest check (:class:`BadLine`) and every image
    that failed to encode (``(line_no, reason)``) -- in ``<run_dir>/skipped.jsonl``: one entry per
    manifest line, in line order, with all its reasons. ``None`` (and no file) when nothing was skipped."""
    path = Path(run_dir) / "skipped.jsonl"
    reasons: dict[int, list[str]] = {}
    texts: dict[int, str] = {}
    for item in skipped:
        bad = item if isinstance(item, BadLine) else BadLine(int(item[0]), str(item[1]), "")
        if bad.reason not in reasons.setdefault(bad.line_no, []):  # a line bad in every split: listed once
            reasons[bad.line_no].append(bad.reason)
        texts[bad.line_no] = texts.get(bad.line_no) or bad.text
    if not reasons:
        path.unlink(missing_ok=True)  # an earlier start's list is not this run's
        return None
    if not all(texts.values()):  # lines that failed at encoding: their text from the manifest
        try:
            lines = Path(manifest).read_text().splitlines()
        except OSError:
            lines = []
        texts = {n: t or (lines[n - 1] if 0 < n <= len(lines) else "") for n, t in texts.items()}
    merged = [BadLine(n, "; ".join(reasons[n]), texts[n]) for n in sorted(reasons)]
    write_text(path, "".join(b.to_json() + "\n" for b in merged))
    log.warning("%d bad manifest line(s) of %s skipped in all; listed in %s", len(merged), manifest, path)
    return path


# -- sizes ------------------------------------------------------------------------------------------
def fit_size(height: int, width: int, max_pixels: int, multiple: int) -> tuple[int, int]:
    """Pixel size an image is resized to: its own aspect ratio, area <= ``max_pixels``, sides
    multiples of ``multiple`` (VAE downsampling x 2x2 patch)."""
    scale = min(1.0, math.sqrt(max_pixels / (height * width)))
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    while h * w > max_pixels and max(h, w) > multiple:  # rounding up may overshoot the area
        if h >= w:
            h -= multiple
        else:
            w -= multiple
    return h, w


def load_pixels(path: Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(3, H, W) float in [-1, 1]; resized (Lanczos) to ``size`` = (H, W) when given."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and (im.height, im.width) != tuple(size):
            im = im.resize((size[1], size[0]), Image.LANCZOS)
        array = np.asarray(im, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.height, im.width


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


# -- batches ----------------------------------------------------------------------------------------
class BucketBatches:
    """Deterministic batches of equal-shape samples.

    ``keys[i]`` is sample i's bucket (its latent shapes); a sample with ``repeats[i]`` = n is in it n
    times. Each epoch shuffles within buckets with ``(seed, epoch)``, cuts full batches (a bucket's
    remainder waits for another epoch's shuffle, so every batch splits evenly across processes) and
    shuffles the batch order. A position is
    ``(epoch, index)``, so a run resumes mid-epoch on exactly the batch it would have seen.
    """

    def __init__(self, keys: list, batch_size: int, seed: int = 0, repeats: list[int] | None = None):
        self.batch_size, self.seed = batch_size, seed
        self.buckets: dict = {}
        for i, key in enumerate(keys):  # ``repeats[i]``: how often sample i comes in each epoch
            self.buckets.setdefault(key, []).extend([i] * (repeats[i] if repeats else 1))
        small = {k: len(v) for k, v in self.buckets.items() if len(v) < batch_size}
        if small:
            log.warning("%d shape bucket(s) hold fewer samples than the batch (%d) and are never used: %s",
                        len(small), batch_size, small)
        if len(small) == len(self.buckets):
            raise ValueError(f"no shape bucket holds a full batch of {batch_size}; lower data.batch_size")

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}")
        batches = []
        for key in sorted(self.buckets, key=repr):
            members = list(self.buckets[key])
            rng.shuffle(members)
            for start in range(0, len(members) - self.batch_size + 1, self.batch_size):
                batches.append(members[start:start + self.batch_size])
        rng.shuffle(batches)
        return batches

    def __len__(self) -> int:
        return sum(len(v) // self.batch_size for v in self.buckets.values())

    def iterate(self, epoch: int = 0, index: int = 0):
        """Yields ``(epoch, index, batch)`` forever from the given position."""
        while True:
            batches = self.epoch(epoch)
            for i in range(index, len(batches)):
                yield epoch, i, batches[i]
            epoch, index = epoch + 1, 0
