"""Pixel measurements for the toy judge: masks, colour agreement and artifact detectors.

Everything works on HxWx3 float32 arrays in 0..255 and is plain numpy, well under a millisecond
per call at 64 px. The artifact detectors look at the output itself (the plan only says where the
background should be plain), so a clean but wrong picture (a reference returned unchanged) is not
called unrealistic:

- ``speckle``: mean over pixels of the colour distance to the *closest* of the 8 neighbours. In a
  drawn picture (and after blur or JPEG) every pixel has a near-identical neighbour, so this is ~0;
  per-pixel noise of std s raises it to about s.
- ``banding``: share of rows (or columns) whose plain-background pixels mostly show a large second
  difference: stripes running through areas the world leaves plain.
- ``sharpness``: at strong, monotone five-pixel colour ramps, the largest one-pixel step over the
  whole ramp: 1 for a crisp edge, ~0.66 after a Gaussian blur of sigma 0.6, ~0.3 at sigma 1.5.
- ``off_palette``: share of locally flat pixels far from every colour the world can contain.
"""
from __future__ import annotations

import numpy as np


def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel Euclidean RGB distance (0..441)."""
    d = a - b
    return np.sqrt(np.einsum("...c,...c->...", d, d))


def _grow(mask: np.ndarray, op) -> np.ndarray:
    """3x3 neighbourhood ``op`` (``np.logical_or`` / ``np.logical_and``) done separably; pixels past
    the border do not take part."""
    rows = mask.copy()
    op(rows[1:], mask[:-1], out=rows[1:])
    op(rows[:-1], mask[1:], out=rows[:-1])
    out = rows.copy()
    op(out[:, 1:], rows[:, :-1], out=out[:, 1:])
    op(out[:, :-1], rows[:, 1:], out=out[:, :-1])
    return out


def dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    for _ in range(steps):
        mask = _grow(mask, np.logical_or)
    return mask


def erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    for _ in range(steps):
        mask = _grow(mask, np.logical_and)
    return mask


def bbox(mask: np.ndarray):
    """``(y0, y1, x0, x1)`` end-exclusive, or None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def window(mask: np.ndarray, margin: int) -> np.ndarray:
    """The mask's bounding box grown by ``margin`` pixels, as a mask."""
    out = np.zeros_like(mask)
    box = bbox(mask)
    if box is not None:
        y0, y1, x0, x1 = box
        out[max(0, y0 - margin):y1 + margin, max(0, x0 - margin):x1 + margin] = True
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def colour_classes(expected: np.ndarray, mask: np.ndarray, interior=None, *, tol: float = 70.0,
                   loose_tol: float = 110.0, min_core: int = 3):
    """What ``class_accuracy`` needs of the expected picture inside ``mask``, computed once per plan:
    pixel indices, the distinct colours there (Kx3), each pixel's colour label and its tolerance.

    With ``interior`` (``uniform_pixels`` of the expected picture) a colour is judged on its core
    pixels within ``tol``, so a VAE's soft rims do not count against it. A colour with fewer than
    ``min_core`` core pixels (the dots and checks of a small garment) is judged on its inner pixels
    (or all, if it has none) within ``loose_tol``: blur mixes every one of them, and the
    nearest-colour rule still decides.
    """
    flat = expected.reshape(-1, 3).astype(np.int32)
    index = np.flatnonzero(mask)
    keys = (flat[index, 0] << 16) | (flat[index, 1] << 8) | flat[index, 2]
    unique, labels = np.unique(keys, return_inverse=True)
    labels = labels.reshape(-1)
    tols = np.full(unique.size, float(tol), np.float32)
    if interior is not None:
        core, inner = (x.reshape(-1)[index] for x in interior)
        keep = np.ones(index.size, bool)
        for k in range(unique.size):
            mine = labels == k
            if np.count_nonzero(mine & core) >= min_core:
                keep &= ~mine | core
            else:
                tols[k] = loose_tol
                if np.count_nonzero(mine & inner) >= min_core:
                    keep &= ~mine | inner
        index, labels = index[keep], labels[keep]
    classes = np.stack([(unique >> 16) & 255, (unique >> 8) & 255, unique & 255], 1).astype(np.float32)
    return index, classes, labels, tols


def class_accuracy(out: np.ndarray, prepared, min_count: int = 3) -> float:
    """Worst per-colour accuracy of telling the expected colours apart (``prepared`` = ``colour_classes``).

    Each pixel is assigned the nearest of the colours the expected picture shows there; it is right
    when that is its own expected colour and within that colour's tolerance. The score is the worst
    colour's share of right pixels, so a pattern colour or half a garment cannot be outvoted.
    """
    index, classes, labels, tols = prepared
    if index.size == 0:
        return 1.0
    got = out.reshape(-1, 3)[index]
    sq = (got * got).sum(1)[:, None] - 2.0 * got @ classes.T + (classes * classes).sum(1)[None, :]
    nearest = sq.argmin(1)
    right = (nearest == labels) & (sq[np.arange(labels.size), labels] <= tols[labels] ** 2)
    counts = np.bincount(labels, minlength=len(classes))
    hits = np.bincount(labels, weights=right, minlength=len(classes))
    ok = counts >= min_count
    return float((hits[ok] / counts[ok]).min()) if ok.any() else float(right.mean())


def _sq_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a - b
    return np.einsum("...c,...c->...", d, d)


def speckle(image: np.ndarray) -> float:
    h, w = image.shape[:2]
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    best = None
    for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
        d = _sq_distance(image, padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w])
        best = d if best is None else np.minimum(best, d, out=best)
    return float(np.sqrt(best).mean())


def banding(image: np.ndarray, plain: np.ndarray, step: float = 8.0, min_pixels: int = 8) -> float:
    """Fraction of rows or columns (the worse) crossed by a stripe where the picture should be plain.

    ``plain``: HxW mask of pixels the plan leaves as smooth background; a row counts when its
    median second difference there is above ``step`` (summed over RGB).
    """
    lum = image.sum(-1)
    worst = 0.0
    for grid, region in ((lum, plain), (lum.T, plain.T)):
        second = np.abs(grid[1:-1] - 0.5 * (grid[:-2] + grid[2:]))
        inner = region[1:-1] & region[:-2] & region[2:]
        counts = inner.sum(1)
        rows = counts >= min_pixels
        if rows.any():  # "median above step" = more than half of the row's plain pixels above it
            hits = ((second > step) & inner).sum(1) * 2 > counts
            worst = max(worst, float(hits[rows].mean()))
    return worst


def ramp_ratios(image: np.ndarray, min_step: float = 50.0) -> np.ndarray:
    """One ratio per strong colour ramp (see ``sharpness``)."""
    ratios = []
    for grid in (image, image.transpose(1, 0, 2)):
        n = grid.shape[1] - 5  # runs k..k+5, centred on the step k+2 -> k+3
        if n <= 0:
            continue
        cols = [grid[:, i:i + n] for i in range(6)]
        span = cols[5] - cols[0]
        d5 = np.sqrt(np.einsum("...c,...c->...", span, span))
        unit = span / np.maximum(d5, 1e-6)[..., None]
        along = [np.einsum("...c,...c->...", c - cols[0], unit) for c in cols]
        steps = np.stack([along[i + 1] - along[i] for i in range(5)])
        mid = steps[2]
        ramp = (steps >= -0.1 * d5).all(0) & (mid > 0) & (mid >= steps.max(0)) & (d5 >= min_step)
        ratios.append(np.minimum(mid[ramp] / d5[ramp], 1.0))
    return np.concatenate(ratios) if ratios else np.zeros(0, np.float32)


def sharpness(image: np.ndarray, expect_ramps: bool = True, min_ramps: int = 8) -> float:
    """Median one-pixel share of strong five-pixel colour ramps (blur).

    For every run of 6 pixels along a row or column whose colour changes monotonically by at least
    50 (so texture oscillations are left out), the largest single step divided by the whole
    change, taken where that step is the middle one: 1 at a crisp edge, ~0.66 after a Gaussian
    blur of sigma 0.6, ~0.4 at 1.0, ~0.3 at 1.5. With fewer than ``min_ramps`` ramps: 0 if ramps
    were expected (the crisp picture has them) and the picture has structure but no steep step
    anywhere (blurred flat), else 1 (nothing to judge: plain, or busy textures without clean ramps).
    """
    ratios = ramp_ratios(image)
    if ratios.size >= min_ramps:
        return float(np.median(ratios))
    if not expect_ramps or (_range3(image) > 16.0).mean() < 0.05:
        return 1.0  # a plain picture: nothing to judge
    steepest = max(np.percentile(distance(image[:, 1:], image[:, :-1]), 99),
                   np.percentile(distance(image[1:], image[:-1]), 99))
    return 0.0 if steepest < 40.0 else 1.0  # smoothed flat, or crisp but without clean ramps


def _range3(image: np.ndarray) -> np.ndarray:
    """Per-pixel colour range (max over channels of max - min) in its 3x3 neighbourhood."""
    hi, lo = image.copy(), image.copy()
    for grid in (hi, lo):
        op = np.maximum if grid is hi else np.minimum
        rows = grid.copy()
        op(rows[1:], grid[:-1], out=rows[1:])
        op(rows[:-1], grid[1:], out=rows[:-1])
        grid[:] = rows
        op(grid[:, 1:], rows[:, :-1], out=grid[:, 1:])
        op(grid[:, :-1], rows[:, 1:], out=grid[:, :-1])
    return (hi - lo).max(-1)


def flat_pixels(image: np.ndarray, max_range: float = 40.0) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood spans little colour (not on an edge)."""
    return _range3(image) <= max_range


def uniform_pixels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(core, inner)``: pixels equal to all 8 neighbours (the inside of a drawn area), and pixels
    equal to at least 3 of their 4 side neighbours (also the edge middles of a 3x3 dot)."""
    rgb = np.asarray(image).astype(np.int32)
    key = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    padded = np.pad(key, 1, mode="edge")
    h, w = key.shape
    core = np.ones((h, w), bool)
    sides = np.zeros((h, w), np.int8)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                same = padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] == key
                core &= same
                if dy == 0 or dx == 0:
                    sides += same
    return core, sides >= 3


def off_palette(image: np.ndarray, points: np.ndarray, segments: list, tol: float = 45.0) -> float:
    """Fraction of flat pixels farther than ``tol`` from every allowed colour.

    ``points``: Kx3 allowed colours; ``segments``: (a, b) pairs of colours whose blends are allowed
    (gradient backgrounds). Every second pixel is tested, which is plenty at 64 px.
    """
    flat = flat_pixels(image)[::2, ::2]
    pixels = image[::2, ::2][flat]
    if pixels.size == 0:
        return 0.0
    sq = (pixels * pixels).sum(1)[:, None] - 2.0 * pixels @ points.T + (points * points).sum(1)[None, :]
    best = np.sqrt(np.maximum(sq.min(1), 0.0))
    for a, b in segments:
        ab = b - a
        t = np.clip((pixels - a) @ ab / max(float(ab @ ab), 1e-6), 0.0, 1.0)
        best = np.minimum(best, distance(pixels, a + t[:, None] * ab))
    return float((best > tol).mean())


def blank(image: np.ndarray, tol: float = 12.0) -> float:
    """Share of pixels within ``tol`` of the mean colour (1.0 for a uniform picture)."""
    mean = image.reshape(-1, 3).mean(0)
    return float((distance(image, mean) <= tol).mean())
