"""The toy judge's measurements: what the plan says (rendered once, cached) against the output.

``PlanRenders`` holds everything derived from a plan alone (the exact target, what lies under the
edit, which pixels the instruction may change, plain background, ...). DDPO judges the same prompt
many times, so ``ToyJudge`` keeps these in a small LRU cache keyed by the plan. ``Measure`` then
measures one output and returns the named values the thresholds in judge/toy/__init__.py decide on.
"""
from __future__ import annotations

import copy

import numpy as np

from . import metrics as m

from . import scene as toy_scene

FOREGROUND_TOL = 48.0  # RGB distance: "differs from what was there"
APPEARANCE_TOL = 70.0  # RGB distance: "is this colour", after nearest-colour assignment
# The unit of a stray change: a small object's side as a fraction of the shorter picture side (world
# v3's small shapes; world v4 draws every shape larger, at a quarter).
SMALL_OBJECT = 0.19
ORDERED_TASKS = ("group_portrait", "two_figures_scene")  # two figures, each on its instructed side
LOOK_KEYS = ("skin", "garment", "texture", "colour2", "legs")
PALETTE = np.array(list(toy_scene.COLOURS.values()), np.float32)


def _without(scene: dict, indices) -> dict:
    drop = set(indices)
    return dict(scene, elements=[e for i, e in enumerate(scene["elements"]) if i not in drop])


def _f32(pixels) -> np.ndarray:
    return pixels.astype(np.float32)


class PlanRenders:
    """Pictures and masks that follow from the plan (no output needed)."""

    def __init__(self, plan: dict):
        self.plan = plan
        target, owner, parts = toy_scene.render(plan["target"], with_parts=True)
        base, base_owner = toy_scene.render(plan["base"], with_owner=True)
        self.target, self.owner, self.parts = _f32(target), owner, parts
        self.base, self.base_owner = _f32(base), base_owner
        self.edited, self.base_edited = list(plan["edited"]), list(plan["base_edited"])
        self.underlay = _f32(toy_scene.render(_without(plan["target"], self.edited)))
        self.refs = [_f32(toy_scene.render(s)) for s in plan.get("refs", [])]
        self.masks = [owner == e for e in self.edited if np.count_nonzero(owner == e) >= 4]
        # "Something is there" threshold per element: a third of its own contrast with what lies under
        # it (so a blur's halo around a high-contrast shape does not count), at least FOREGROUND_TOL.
        contrast = m.distance(self.target, self.underlay)
        self.found_tol = [float(np.clip(0.3 * np.median(contrast[mask]), FOREGROUND_TOL, 90.0))
                          for mask in self.masks]
        self.interior = m.uniform_pixels(target)  # inside a drawn area, away from its soft rim
        self.part_masks = self._parts(owner, parts)
        self.looks = [[m.colour_classes(target, p, self.interior, tol=APPEARANCE_TOL) for p in pieces]
                      for pieces in self.part_masks]
        self.keep, self.vacated = self._zones(owner, base_owner)
        self.differ = m.distance(self.target, self.base) > FOREGROUND_TOL
        self.plain = (owner == -1) & m.flat_pixels(self.target, 16.0)  # background, gradients included
        h, w = plan["size"]
        self.small_area = float((SMALL_OBJECT * min(h, w)) ** 2)
        self.segments = [(toy_scene.rgb(b["top"]), toy_scene.rgb(b["bottom"]))
                         for s in [plan["target"], plan["base"], *plan.get("refs", [])]
                         for b in [s["background"]] if b["kind"] == "gradient"]
        self._expect_ramps = self._any_blank = None
        self._swapped = None

    def _parts(self, owner, parts) -> list[list[np.ndarray]]:
        """Per edited element, the mask of each of its parts (head, garment, legs, arms / shape)."""
        part_masks = []
        for e in self.edited:
            pieces = [(owner == e) & (parts == p) for p in np.unique(parts[owner == e])]
            pieces = [p for p in pieces if np.count_nonzero(p) >= 6]
            if pieces:
                part_masks.append(pieces)
        if self.plan["task"] == "style_transfer" and part_masks:
            # One style on every shape: pool them, so small shapes still show the pattern colour.
            part_masks = [[np.logical_or.reduce([p for pieces in part_masks for p in pieces])]]
        return part_masks

    def _zones(self, owner, base_owner) -> tuple[np.ndarray, np.ndarray]:
        """``keep``: pixels the instruction leaves alone (2 px away from anything it touches);
        ``vacated``: where a moved or removed object was and nothing new is."""
        zone = np.zeros(owner.shape, bool)
        for e in self.edited:
            zone |= owner == e
        old = np.zeros_like(zone)
        for e in self.base_edited:
            old |= base_owner == e
        new = np.logical_or.reduce(self.masks) if self.masks else np.zeros_like(zone)
        vacated = old & ~m.dilate(new, 1)
        inner = m.erode(vacated)
        return ~m.dilate(zone | old, 2), (inner if np.count_nonzero(inner) >= 6 else vacated)

    @property
    def expect_ramps(self) -> bool:
        """Whether the crisp target has edges for ``sharpness`` to measure (asked rarely: lazy)."""
        if self._expect_ramps is None:
            self._expect_ramps = m.ramp_ratios(self.target).size >= 8
        return self._expect_ramps

    @property
    def any_blank(self) -> bool:
        """Whether the target or a reference is itself one flat colour (then "blank" is no artifact)."""
        if self._any_blank is None:
            self._any_blank = any(m.blank(p) >= 0.99 for p in [self.target, *self.refs])
        return self._any_blank

    def swapped_looks(self) -> list:
        """Colour classes of the target with the two figures' looks exchanged (ORDERED_TASKS)."""
        if self._swapped is None:
            scene = copy.deepcopy(self.plan["target"])
            a, b = (scene["elements"][i] for i in self.edited[:2])
            for key in LOOK_KEYS:
                a[key], b[key] = b[key], a[key]
            other = toy_scene.render(scene)
            self._swapped = [[m.colour_classes(other, p, self.interior, tol=APPEARANCE_TOL) for p in pieces]
                             for pieces in self.part_masks[:2]]
        return self._swapped


class Measure:
    """One output against its plan's renders; each method returns ``(value, text)``."""

    def __init__(self, out: np.ndarray, renders: PlanRenders):
        self.out, self.r = out, renders
        self.lift = m.distance(out, renders.underlay)  # how far each pixel is from what lies under the edit
        self._presence = None
        self._err = None

    def applies(self, name: str) -> bool:
        if name in ("presence", "appearance", "broken"):
            return bool(self.r.masks)
        if name == "order":
            return self.r.plan["task"] in ORDERED_TASKS and len(self.r.looks) >= 2
        if name == "vacated":
            return bool(self.r.vacated.any())
        return True

    def presence_and_cut(self):
        if self._presence is None:
            values, cut = [], 0.0
            edited = np.logical_or.reduce(self.r.masks)
            for mask, tol in zip(self.r.masks, self.r.found_tol):
                box = m.bbox(mask)
                margin = max(3, round(0.3 * min(box[1] - box[0], box[3] - box[2])))
                # Within a margin around the planned mask, leaving out the other edited elements.
                found = (self.lift > tol) & m.window(mask, margin) & (mask | ~edited)
                values.append(m.iou(found, mask))
                cut = max(cut, cut_off(found, mask))
            self._presence = (min(values), cut)
        return self._presence

    def presence(self):
        value = self.presence_and_cut()[0]
        return value, f"the edited element sits where the plan puts it, at its size (overlap {value:.2f})"

    def _accuracies(self, looks) -> list[float]:
        return [m.class_accuracy(self.out, prepared) for prepared in looks]

    def appearance(self):
        value = min(min(self._accuracies(looks)) for looks in self.r.looks) if self.r.looks else 1.0
        return value, f"colours and patterns of the edited parts match their sources ({value:.2f})"

    def order(self):
        own = [np.mean(self._accuracies(looks)) for looks in self.r.looks[:2]]
        swapped = [np.mean(self._accuracies(looks)) for looks in self.r.swapped_looks()]
        margin = float(min(a - b for a, b in zip(own, swapped)))
        return margin, f"each figure is on its instructed side (margin {margin:+.2f})"

    def _error(self) -> np.ndarray:
        if self._err is None:
            self._err = m.distance(self.out, self.r.target)
        return self._err

    def _disagree(self) -> np.ndarray:
        return self._error() > FOREGROUND_TOL

    def preserve(self):
        keep = self.r.keep
        value = 1.0 - float(self._disagree()[keep].mean()) if keep.any() else 1.0
        return value, f"{value:.0%} of the part of the picture the edit leaves alone is unchanged"

    def stray(self):
        core = np.count_nonzero(m.erode(self.r.keep & self._disagree())) / self.r.small_area
        return core, f"unplanned change outside the edit: {core:.2f} small-object areas"

    def vacated(self):
        value = 1.0 - float(self._disagree()[self.r.vacated].mean())
        return value, f"{value:.0%} of the old spot shows what should be there now"

    def changed(self):
        differ = self.r.differ
        if not differ.any():
            return 1.0, "nothing to change"
        closer = self._error()[differ] < m.distance(self.out, self.r.base)[differ]
        value = float(closer.mean())
        return value, f"{value:.0%} of the pixels to change took their new look"

    def blank(self):
        value = m.blank(self.out)
        if value >= 0.9 and self.r.any_blank:
            value = 0.0  # a flat picture is what this sample's pictures look like
        return value, f"{value:.1%} of the picture is one flat colour"

    def speckle(self):
        value = m.speckle(self.out)
        return value, f"per-pixel noise level {value:.1f}"

    def banding(self):
        value = m.banding(self.out, self.r.plain)
        return value, f"{value:.0%} of rows/columns crossed by stripes"

    def sharpness(self):
        ratios = m.ramp_ratios(self.out)
        value = float(np.median(ratios)) if ratios.size >= 8 else m.sharpness(self.out, self.r.expect_ramps)
        return value, f"edge sharpness {value:.2f}"

    def off_palette(self):
        value = m.off_palette(self.out, PALETTE, self.r.segments)
        return value, f"{value:.1%} of flat areas in colours the world does not have"

    def broken(self):
        value = self.presence_and_cut()[1]
        return value, "an edited object is cut off" if value else "no edited object is cut off"


def cut_off(found: np.ndarray, mask: np.ndarray) -> float:
    """1.0 when what was found of ``mask`` is a piece of it sliced off straight: the planned shape
    up to a vertical or horizontal line that leaves out at least a quarter of it (a half-pasted
    object) - not a smaller, displaced or wrongly coloured whole object."""
    area = max(1, np.count_nonzero(mask))
    present = found & mask
    inside = np.count_nonzero(present) / area
    outside = np.count_nonzero(found & ~m.dilate(mask)) / area
    got, want = m.bbox(present), m.bbox(mask)
    if got is None or not 0.15 <= inside <= 0.8 or outside > 0.25:
        return 0.0
    for lo, hi, full_lo, full_hi, axis in ((got[2], got[3], want[2], want[3], 1),
                                           (got[0], got[1], want[0], want[1], 0)):
        touches = lo <= full_lo + 1 or hi >= full_hi - 1
        if touches and hi - lo <= 0.75 * (full_hi - full_lo):
            band = np.zeros_like(mask)
            if axis == 1:
                band[:, lo:hi] = True
            else:
                band[lo:hi, :] = True
            if m.iou(present, mask & band) >= 0.8:
                return 1.0
    return 0.0
