"""Broken and degraded outputs for a toy sample: the judge's calibration set.

``corrupt(kind, sample, rng)`` returns an HxWx3 uint8 picture at the target's size, or None where a
corruption does not apply to the sample (e.g. reference 2 of a single-reference edit).

Failures (a judge must answer "no" to the right question):
``ref1`` / ``ref2`` (a reference returned unchanged), ``blank``, ``noise`` (uniform random pixels),
``wrong_place`` (the edit at another place, or on the wrong object / side), ``wrong_colour`` (the
edit with a colour from neither reference), ``wrong_size`` (the other figure scale; a shape half as
large again), ``half`` (only half of the edit pasted), ``gauss_noise`` (exact target + Gaussian
noise, sigma 20), ``banding`` (exact target + 2-pixel horizontal stripes of +-16), ``heavy_blur``
(Gaussian, sigma 1.5), ``splotches`` (three discs of colours the world does not have, as a VAE's
out-of-range blobs).
Degradations a VAE causes, which must still pass: ``blur`` (sigma 0.6), ``jpeg`` (quality 75, full
colour resolution), ``shift`` (up to +-8 per channel), ``vae_like`` (blur 0.5 + shift 6 + JPEG 85).
Informational: ``jpeg420`` (quality 75 with halved colour resolution, which smears the 3-pixel
colour patterns of textures and garments).
"""
from __future__ import annotations

import copy
import functools
import io

import numpy as np
from PIL import Image

from judge.toy.scene import (
    BACKGROUND_COLOURS,
    COLOURS,
    FIGURE_COLUMNS,
    OBJECT_COLOURS,
    PLACES,
    background_samples,
    colour_distance,
    render,
    rgb,
    shape_box,
)

from .tasks import CONTRAST, GROUP_SLOTS

FAILURES = ("ref1", "ref2", "blank", "noise", "wrong_place", "wrong_colour", "wrong_size", "half",
            "gauss_noise", "banding", "heavy_blur", "splotches")
DEGRADATIONS = ("blur", "jpeg", "shift", "vae_like")
INFORMATIONAL = ("jpeg420",)  # measured and reported, no pass/fail demanded
KINDS = FAILURES + DEGRADATIONS + INFORMATIONAL


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    out = image.astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        out = sum(k * np.take(padded, np.arange(i, i + n), axis=axis) for i, k in enumerate(kernel))
    return _u8(out)


def jpeg(image: np.ndarray, quality: int, subsampling: int = 0) -> np.ndarray:
    """JPEG round trip; ``subsampling`` 0 keeps full colour resolution (4:4:4), 2 halves it (4:2:0)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")).copy()


def _u8(image) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _resize(image: np.ndarray, size) -> np.ndarray:
    if tuple(image.shape[:2]) == tuple(size):
        return image.copy()
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.NEAREST))


def _other_colour(rng, avoid, backgrounds):
    away = [rgb(c) for c in avoid if c] + [c for b in backgrounds for c in background_samples(b)]
    names = [n for n in OBJECT_COLOURS if all(colour_distance(rgb(n), a) >= CONTRAST for a in away)]
    if not names:
        names = [n for n in OBJECT_COLOURS if n not in avoid]
    return names[int(rng.integers(len(names)))]


def _move_box(box, dx, dy):
    return [box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy]


def _wrong_place(plan, rng):
    task, target, roles = plan["task"], copy.deepcopy(plan["target"]), plan["roles"]
    h, w = plan["size"]
    elements = target["elements"]
    if task == "animal_scene" or (task == "single_edit" and roles["op"] in ("add", "move")):
        e = elements[plan["edited"][0]]
        wrong = [p for p in PLACES if p != roles.get("new_place", roles["place"]) and p != roles["place"]]
        e["box"] = shape_box(wrong[int(rng.integers(len(wrong)))], h, w, e["box"][2] - e["box"][0])
    elif task in ("person_scene", "clothing_replace"):
        e = elements[plan["edited"][0]]
        centre = (e["box"][0] + e["box"][2]) / 2 / w
        far = max(FIGURE_COLUMNS.values(), key=lambda x: abs(x - centre))
        e["box"] = _move_box(e["box"], round((far - centre) * w), 0)
    elif task in ("group_portrait", "two_figures_scene"):  # the two figures on each other's side
        a, b = (elements[i] for i in plan["edited"])
        shift = round((GROUP_SLOTS["right"] - GROUP_SLOTS["left"]) * w)
        sign = 1 if a["box"][0] < b["box"][0] else -1
        a["box"], b["box"] = _move_box(a["box"], sign * shift, 0), _move_box(b["box"], -sign * shift, 0)
    elif task == "style_transfer":  # the style on another layout: every shape at another place
        for e, place in zip(elements, _shuffled_places(plan, rng)):
            e["box"] = shape_box(place, h, w, e["box"][2] - e["box"][0])
    else:  # single_edit recolour / remove: the edit applied to another object
        base = copy.deepcopy(plan["base"])
        others = [i for i in range(len(base["elements"])) if i not in plan["base_edited"]]
        victim = others[int(rng.integers(len(others)))]
        if roles["op"] == "remove":
            del base["elements"][victim]
        else:
            base["elements"][victim]["colour"] = roles["new_colour"]
        return base
    return target


def _shuffled_places(plan, rng):
    h, w = plan["size"]
    taken = {_place_of(e["box"], h, w) for e in plan["target"]["elements"]}
    free = [p for p in PLACES if p not in taken]
    order = rng.permutation(len(free))
    return [free[i] for i in order] + sorted(taken)


def _place_of(box, h, w):
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return PLACES[min(2, int(cy * 3 / h)) * 3 + min(2, int(cx * 3 / w))]


def _wrong_colour(plan, rng):
    task, target = plan["task"], copy.deepcopy(plan["target"])
    elements = target["elements"]
    if task == "single_edit" and plan["roles"]["op"] == "remove":
        return None
    backgrounds = [target["background"]]
    e = elements[plan["edited"][0]]
    if task == "style_transfer" and plan["roles"]["mode"] == "texture":
        new = _other_colour(rng, [e["colour"], e["colour2"], plan["base"]["elements"][0]["colour"]], backgrounds)
        for el in elements:
            el["colour2"] = new
        return target
    if e["kind"] == "figure":
        old = [e["garment"], e["colour2"], e["skin"], e["legs"]]
        if task == "clothing_replace":
            old.append(plan["base"]["elements"][plan["base_edited"][0]]["garment"])
        e["garment"] = _other_colour(rng, old, backgrounds)
        return target
    old = [e["colour"], e["colour2"]] + [b.get("colour") for b in plan["base"]["elements"]]
    new = _other_colour(rng, old, backgrounds)
    for i in (plan["edited"] if task == "style_transfer" else plan["edited"][:1]):
        elements[i]["colour"] = new
    return target


def _wrong_size(plan, rng):
    task, target = plan["task"], copy.deepcopy(plan["target"])
    h, w = plan["size"]
    if task == "person_scene":
        e = target["elements"][plan["edited"][0]]
        box = e["box"]
        height = box[3] - box[1]
        new = round(height * (0.58 if plan["roles"]["scale"] == "large" else 1.7))
        cx, width = (box[0] + box[2]) / 2, round(0.6 * new)
        e["box"] = [round(cx - width / 2), box[3] - new, round(cx - width / 2) + width, box[3]]
        return target
    if task == "animal_scene" or (task == "single_edit" and plan["roles"]["op"] == "add"):
        e = target["elements"][plan["edited"][0]]
        side = round(1.5 * (e["box"][2] - e["box"][0]))  # shapes have one size; this is not it
        e["box"] = shape_box(plan["roles"]["place"], h, w, side)
        return target
    return None


def _half(sample) -> np.ndarray:
    """Image 1's content (the plan's base) with only the left half of the edit pasted onto it (the
    changed pixels left of the column that splits them in two equal counts)."""
    base = render(sample.plan["base"])
    target = sample.target
    changed = (base != target).any(-1)
    out = base.copy()
    if changed.any():
        per_column = np.cumsum(changed.sum(0))
        mid = int(np.searchsorted(per_column, per_column[-1] / 2, side="right"))  # <= half the pixels left of it
        left = changed & (np.arange(changed.shape[1])[None, :] < mid)
        out[left] = target[left]
    return out


@functools.lru_cache(maxsize=1)
def _far_colours(min_dist: float = 80.0):
    """RGB colours on a coarse grid far from every colour of the world and every background blend."""
    palette = np.array([rgb(n) for n in COLOURS])
    grid = np.stack(np.meshgrid(*[np.arange(0, 256, 16.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    best = np.sqrt(((grid[:, None] - palette[None]) ** 2).sum(-1)).min(1)
    backgrounds = [rgb(n) for n in BACKGROUND_COLOURS]
    for i, a in enumerate(backgrounds):
        for b in backgrounds[i + 1:]:
            t = np.clip((grid - a) @ (b - a) / float((b - a) @ (b - a)), 0, 1)
            best = np.minimum(best, np.sqrt(((grid - a - t[:, None] * (b - a)) ** 2).sum(1)))
    return grid[best >= min_dist]


def _splotches(target: np.ndarray, rng, count: int = 3, radius: float = 6.0) -> np.ndarray:
    colours = _far_colours()
    out = target.copy()
    h, w = target.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w]
    for _ in range(count):
        cy, cx = rng.uniform(radius, h - radius), rng.uniform(radius, w - radius)
        out[(ys - cy) ** 2 + (xs - cx) ** 2 <= radius * radius] = colours[int(rng.integers(len(colours)))]
    return out


def corrupt(kind: str, sample, rng) -> np.ndarray | None:
    """``sample``: anything with ``refs``, ``target`` (uint8 pixels) and ``plan`` (a ToySample)."""
    plan, target = sample.plan, sample.target
    size = tuple(target.shape[:2])
    if kind == "ref1":
        return _resize(sample.refs[0], size)
    if kind == "ref2":
        return _resize(sample.refs[1], size) if len(sample.refs) > 1 else None
    if kind == "blank":
        return np.full(target.shape, 128, np.uint8)
    if kind == "noise":
        return rng.integers(0, 256, target.shape, dtype=np.uint8)
    if kind in ("wrong_place", "wrong_colour", "wrong_size"):
        scene = {"wrong_place": _wrong_place, "wrong_colour": _wrong_colour, "wrong_size": _wrong_size}[kind](plan, rng)
        return None if scene is None else render(scene)
    if kind == "half":
        return _half(sample)
    if kind == "gauss_noise":
        return _u8(target + rng.normal(0.0, 20.0, target.shape))
    if kind == "banding":
        rows = np.where((np.arange(size[0]) // 2) % 2 == 0, 16.0, -16.0)
        return _u8(target.astype(np.float32) + rows[:, None, None])
    if kind == "splotches":
        return _splotches(target, rng)
    if kind == "heavy_blur":
        return gaussian_blur(target, 1.5)
    if kind == "blur":
        return gaussian_blur(target, 0.6)
    if kind == "jpeg":
        return jpeg(target, 75)
    if kind == "jpeg420":
        return jpeg(target, 75, subsampling=2)
    if kind == "shift":
        return _u8(target.astype(np.float32) + rng.integers(-8, 9, 3))
    if kind == "vae_like":
        return jpeg(_u8(gaussian_blur(target, 0.5).astype(np.float32) + rng.integers(-6, 7, 3)), 85)
    raise ValueError(f"unknown corruption {kind!r}; use one of {', '.join(KINDS)}")
