"""Training data: a checked manifest, image sizes and aspect-ratio buckets, deterministic batches.

- :func:`read_manifest` checks every line (shape via ``judge.manifest.parse_line``, then the files:
  missing, unreadable, no target) and returns the good records and the bad lines with reasons.
- :func:`load_manifest` is what the trainer calls: without ``skip_bad`` the first problem stops it
  with the full list of bad lines; with it, bad lines are skipped, and :func:`write_skipped` lists
  every one (all splits, and images that failed to encode) in the run's ``skipped.jsonl``.
- :func:`assign_buckets` gives each image the size of its aspect-ratio bucket: a fixed list of
  resolutions around the pixel budget (:func:`bucket_sizes`, as ai-toolkit and SimpleTuner bucket),
  so each image keeps nearly its own aspect ratio (DESIGN contract 1) and is resized to cover its
  bucket, then centre-cropped (:func:`load_pixels`), never stretched. Each process's share of a batch holds samples whose
  (target, ref1, ref2) latent shapes are equal (:class:`BucketBatches`).
"""
from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from functools import lru_cache
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


def hold_out(records: list[Record], count: int) -> tuple[list[Record], list[Record]]:
    """``(train, held out)``: ``count`` records (at most a tenth) spread evenly over ``records``
    (manifests are often sorted by task, so every task keeps its share), the rest for training."""
    n = min(count, len(records) // 10)
    held = {i * len(records) // n for i in range(n)} if n else set()
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


# -- sizes ------------------------------------------------------------------------------------------
# Width:height of the bucket list: the common photo and screen formats from 1:2 to 2:1 (ai-toolkit's
# and SimpleTuner's buckets span the same range). Few buckets keep a sample's (target, ref1, ref2)
# combination shared by many samples; an image between two formats loses at most ~6 % of a side
# to the crop, one beyond 1:2 or 2:1 more.
BUCKET_RATIOS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1, 4 / 3, 3 / 2, 16 / 9, 2)


@lru_cache(maxsize=64)
def bucket_sizes(max_pixels: int, multiple: int, ratios: tuple = BUCKET_RATIOS) -> tuple[tuple[int, int], ...]:
    """The bucket resolutions (H, W): one per ratio, sides multiples of ``multiple`` (VAE downsampling
    x the 2x2 patch), area as close to ``max_pixels`` as the multiples allow without exceeding it."""
    sizes = set()
    for ratio in ratios:
        w = max(multiple, round(math.sqrt(max_pixels * ratio) / multiple) * multiple)
        h = max(multiple, round(math.sqrt(max_pixels / ratio) / multiple) * multiple)
        while h * w > max_pixels and max(h, w) > multiple:  # rounding up overshot: trim the longer side
            if h * ratio > w:
                h -= multiple
            else:
                w -= multiple
        sizes.add((h, w))
    return tuple(sorted(sizes))


def pixel_budget(height: int, width: int, max_pixels: int) -> int:
    """``max_pixels``, or for a smaller image the largest step ``max_pixels / sqrt(2)**k`` not above
    its area: images are scaled down to their bucket, never up, and small ones share a few levels."""
    area = height * width
    if area >= max_pixels:
        return max_pixels
    k = math.ceil(2 * math.log2(max_pixels / area) - 1e-9)
    return int(max_pixels / 2 ** (k / 2) + 1e-6)


def bucket_size(height: int, width: int, max_pixels: int, multiple: int) -> tuple[int, int]:
    """The pixel size (H, W) of the bucket an ``height`` x ``width`` image goes to: the nearest aspect
    ratio (in log scale) of :func:`bucket_sizes` at its :func:`pixel_budget`."""
    return _ranked(height, width, bucket_sizes(pixel_budget(height, width, max_pixels), multiple), 1)[0][1]


def _ranked(height: int, width: int, sizes, top: int) -> list[tuple[float, tuple[int, int]]]:
    """The ``top`` nearest buckets of an image with their distance |log aspect difference|."""
    aspect = math.log(width / height)
    return sorted(((abs(math.log(s[1] / s[0]) - aspect), s) for s in sizes), key=lambda t: (t[0], -t[1][0] * t[1][1]))[:top]


def assign_buckets(dims: list[list[tuple[int, int]]], max_pixels: int, multiple: int,
                   share: int | None = None, passes: int = 4) -> list[tuple[tuple[int, int], ...]]:
    """Per sample, the bucket size of each of its images (``dims[i]`` = their (H, W)).

    Each image goes to its nearest bucket (:func:`bucket_size`). With ``share`` (samples per process per batch), samples
    are then moved so that fewer combinations are left with a part-share: a combination short of a
    full share takes samples whose every image has that bucket as its nearest or next-nearest one
    (cheapest extra crop first), from combinations with a smaller remainder. Deterministic, so
    every process computes the same assignment.
    """
    prefs = [[_ranked(h, w, bucket_sizes(pixel_budget(h, w, max_pixels), multiple), 2) for h, w in sample]
             for sample in dims]
    keys = [tuple(p[0][1] for p in sample) for sample in prefs]
    if not share or share <= 1:
        return keys
    base = [sum(p[0][0] for p in sample) for sample in prefs]
    reach: dict[tuple, list[tuple[float, int]]] = {}  # combination -> (extra crop, sample) that can go there
    for i, sample in enumerate(prefs):
        combos = [((), 0.0)]
        for options in sample:
            combos = [(c + (s,), d + dist) for c, d in combos for dist, s in options]
        for combo, dist in combos:
            if combo != keys[i]:
                reach.setdefault(combo, []).append((dist - base[i], i))
    for offers in reach.values():
        offers.sort()
    counts: dict[tuple, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    for _ in range(passes):
        moved = False
        for target in sorted(counts, key=lambda k: (-(counts[k] % share), repr(k))):
            have = counts[target] % share
            need = (share - have) % share
            for _, i in reach.get(target, ()):
                if need == 0:
                    break
                source = keys[i]
                if source != target and 0 < counts[source] % share < have:
                    counts[source] -= 1
                    counts[target] = counts[target] + 1
                    keys[i], need, moved = target, need - 1, True
        if not moved:
            break
    return keys


def load_pixels(path: Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(3, H, W) float in [-1, 1]; when ``size`` = (H, W) differs, resized to cover it (aspect ratio
    kept, antialiased bicubic) and centre-cropped to it (kornia) -- never stretched."""
    from PIL import Image

    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB"), dtype=np.float32)
    pixels = torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0
    if size is None or tuple(pixels.shape[1:]) == tuple(size):
        return pixels
    return resize_and_crop(pixels, size)


def resize_and_crop(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) -> (3, *size): scaled to cover ``size`` with its own aspect ratio, then the centre kept."""
    from kornia.geometry.bbox import bbox_generator
    from kornia.geometry.transform import crop_by_indices, resize

    (h, w), (bh, bw) = pixels.shape[1:], size
    scale = max(bh / h, bw / w)
    covered = (max(bh, round(h * scale)), max(bw, round(w * scale)))
    x = pixels[None]
    if covered != (h, w):
        x = resize(x, covered, interpolation="bicubic", antialias=True)
    top, left = (covered[0] - bh) // 2, (covered[1] - bw) // 2
    box = bbox_generator(torch.tensor([float(left)]), torch.tensor([float(top)]),
                         torch.tensor([float(bw)]), torch.tensor([float(bh)]))
    return crop_by_indices(x, box)[0]  # an exact slice: the box has the output's size


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.height, im.width


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


# -- batches ----------------------------------------------------------------------------------------
class BucketBatches:
    """Deterministic batches whose share per process is one shape bucket.

    ``keys[i]`` is sample i's bucket (its latent shapes); a sample with ``repeats[i]`` = n is in it n
    times. Each epoch shuffles within buckets with ``(seed, epoch)`` and cuts full batches of one
    bucket; with ``processes`` > 1 a bucket's remainder is cut into per-process shares
    (``batch_size / processes`` samples) and shares of different buckets fill further batches, since
    each process stacks only its own share. What is left (less than one share per bucket, fewer
    than ``processes`` shares) waits for another epoch's shuffle; then the batch order is shuffled.
    A position is ``(epoch, index)``, so a run resumes mid-epoch on exactly the batch it would have seen.
    """

    def __init__(self, keys: list, batch_size: int, seed: int = 0, repeats: list[int] | None = None,
                 processes: int = 1):
        if batch_size % processes:
            raise ValueError(f"batch size {batch_size} is not a multiple of the {processes} processes")
        self.batch_size, self.seed, self.processes = batch_size, seed, processes
        self.share = batch_size // processes
        self.buckets: dict = {}
        for i, key in enumerate(keys):  # ``repeats[i]``: how often sample i comes in each epoch
            self.buckets.setdefault(key, []).extend([i] * (repeats[i] if repeats else 1))
        small = {k: len(v) for k, v in self.buckets.items() if len(v) < self.share}
        if small:
            log.warning("%d of %d shape bucket(s) hold fewer samples than one process's share of a batch (%d) and "
                        "are never used (%d samples), e.g. %s", len(small), len(self.buckets), self.share,
                        sum(small.values()), dict(list(small.items())[:3]))
        if len(small) == len(self.buckets):
            raise ValueError(f"no shape bucket holds a full batch of {batch_size}; lower data.batch_size")

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}")
        batches, shares = [], []
        for key in sorted(self.buckets, key=repr):
            members = list(self.buckets[key])
            rng.shuffle(members)
            whole = len(members) - len(members) % self.batch_size
            for start in range(0, whole, self.batch_size):
                batches.append(members[start:start + self.batch_size])
            for start in range(whole, len(members) - self.share + 1, self.share):
                shares.append(members[start:start + self.share])  # none when processes == 1
        rng.shuffle(shares)
        for start in range(0, len(shares) - self.processes + 1, self.processes):
            batches.append([i for share in shares[start:start + self.processes] for i in share])
        rng.shuffle(batches)
        return batches

    def __len__(self) -> int:
        whole = sum(len(v) // self.batch_size for v in self.buckets.values())
        shares = sum(len(v) % self.batch_size // self.share for v in self.buckets.values())
        return whole + shares // self.processes

    def usage(self) -> tuple[int, int]:
        """(samples each epoch uses, samples an epoch offers), repeats counted."""
        return len(self) * self.batch_size, sum(len(v) for v in self.buckets.values())

    def describe(self) -> str:
        used, total = self.usage()
        return (f"each epoch uses {used} of {total} samples ({100 * used / max(1, total):.1f} %): {len(self)} "
                f"batches of {self.batch_size} ({self.processes} x {self.share}) from {len(self.buckets)} shape buckets")

    def iterate(self, epoch: int = 0, index: int = 0):
        """Yields ``(epoch, index, batch)`` forever from the given position."""
        while True:
            batches = self.epoch(epoch)
            for i in range(index, len(batches)):
                yield epoch, i, batches[i]
            epoch, index = epoch + 1, 0
