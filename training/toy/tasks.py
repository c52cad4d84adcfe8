"""The five dual-reference tasks of DualShapes (and the opt-in three-reference one): scenes for every
reference, the target, the plan.

Every builder takes a numpy Generator and one ``(H, W)`` size per reference and returns a
:class:`Case`; the target always has image 1's size. Colours that must be told apart (an object and
the background under it, a garment and its pattern) are kept >= ``CONTRAST`` apart in RGB, so the
judge can separate them even after a VAE has softened them.

Plan (shared by all tasks; ``PLAN_VERSION``)::

    {"version", "task", "size": [H, W],
     "refs": [scene, ...],     # every reference as drawn (two; three for two_figures_scene)
     "target": scene,          # the exact target (training/toy/scene.py), re-rendered by the judge
     "base": scene,            # what the output would be if nothing were edited, at the target size
     "edited": [i, ...],       # target elements the instruction creates or changes
     "base_edited": [i, ...],  # base elements it moves, recolours, restyles or removes
     "roles": {...}}           # task specifics: which attribute comes from which reference, where
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from judge.toy.scene import (
    BACKGROUND_COLOURS,
    FIGURE_COLUMNS,
    OBJECT_COLOURS,
    PLACES,
    POSES,
    SHAPES,
    SKIN_COLOURS,
    TEXTURES,
    background_samples,
    colour_distance,
    figure_box,
    rgb,
    shape_box,
)

from . import templates

PLAN_VERSION = 1
CONTRAST = 110.0  # between an element and what lies under or around it
SKIN_CONTRAST = 80.0  # faces against backgrounds (only two skin tones exist)
SKIES = ("sky", "lavender", "cream", "navy")
GROUNDS = ("grass", "sand", "slate", "mint")
GROUP_SLOTS = {"left": 0.25, "right": 0.75}
PERSON_SCALES = ("small", "medium", "large")  # person_scene: image 2's figure is medium


class NoChoice(RuntimeError):
    """No palette colour satisfies the contrast constraints (the builder retries with new draws)."""


@dataclass
class Case:
    task: str
    refs: list  # one scene per reference (one, two or three)
    target: dict
    instruction: str
    plan: dict


def choice(rng, options):
    return options[int(rng.integers(len(options)))]


def pick_colour(rng, names, away=(), min_dist=CONTRAST, exclude=()) -> str:
    """A colour name at least ``min_dist`` from every colour in ``away`` (RGB arrays)."""
    ok = [n for n in names if n not in exclude and all(colour_distance(rgb(n), a) >= min_dist for a in away)]
    if not ok:
        raise NoChoice("no colour fits")
    return choice(rng, ok)


def random_background(rng, kinds=("flat", "gradient", "horizon"), avoid: dict | None = None) -> dict:
    """A background; with ``avoid`` (another background) it shares none of its colours."""
    kind = choice(rng, kinds)
    away = background_samples(avoid) if avoid else []
    # Far enough from every colour of the other background that the two pictures never look alike.
    used = {n for n in BACKGROUND_COLOURS if any(colour_distance(rgb(n), c) < 60.0 for c in away)}
    names = tuple(n for n in BACKGROUND_COLOURS if n not in used)
    if kind == "flat":
        return {"kind": "flat", "colour": choice(rng, names)}
    if kind == "gradient":
        top = choice(rng, names)
        return {"kind": "gradient", "top": top, "bottom": pick_colour(rng, names, [rgb(top)], 60.0)}
    sky = choice(rng, tuple(n for n in SKIES if n not in used) or names)
    ground = pick_colour(rng, tuple(n for n in GROUNDS if n not in used) or names, [rgb(sky)], 60.0)
    return {"kind": "horizon", "sky": sky, "ground": ground, "level": choice(rng, (0.5, 0.6))}


def scene(size, background, elements=()) -> dict:
    return {"size": [int(size[0]), int(size[1])], "background": background, "elements": list(elements)}


def shape_element(shape, colour, box, texture="solid", colour2=None) -> dict:
    return {"kind": "shape", "shape": shape, "colour": colour, "texture": texture, "colour2": colour2,
            "box": [int(v) for v in box]}


def distractors(rng, size, background, places, count, away=()) -> list[dict]:
    """``count`` small plain shapes at distinct free places, contrasting with the background."""
    h, w = size
    chosen = rng.permutation(len(places))[:count]
    bg = background_samples(background)
    return [shape_element(choice(rng, SHAPES), pick_colour(rng, tuple(OBJECT_COLOURS), bg + list(away)),
                          shape_box(places[i], h, w)) for i in chosen]


def random_figure(rng, backgrounds, avoid_garment=None) -> dict:
    """A figure's look (skin, garment, texture, legs, pose) that stands out on every background."""
    bg = [c for b in backgrounds for c in background_samples(b)]
    skin = pick_colour(rng, tuple(SKIN_COLOURS), bg, SKIN_CONTRAST)
    avoid = [rgb(skin)] + ([rgb(avoid_garment)] if avoid_garment else [])
    garment = pick_colour(rng, tuple(OBJECT_COLOURS), bg + avoid)
    texture = choice(rng, ("solid", "solid") + TEXTURES[1:])
    colour2 = None
    if texture != "solid":
        colour2 = pick_colour(rng, tuple(OBJECT_COLOURS), bg + [rgb(garment), rgb(skin)])
    apart = tuple(n for n in OBJECT_COLOURS if colour_distance(rgb(n), rgb(garment)) >= 90.0)
    legs = pick_colour(rng, apart, bg)
    return {"kind": "figure", "box": None, "skin": skin, "garment": garment, "texture": texture,
            "colour2": colour2, "legs": legs, "pose": choice(rng, POSES)}


def placed(figure: dict, box) -> dict:
    out = dict(figure)
    out["box"] = [int(v) for v in box]
    return out


def make_plan(task, refs, target, base, edited, base_edited, roles) -> dict:
    return {"version": PLAN_VERSION, "task": task, "size": list(target["size"]), "refs": list(refs),
            "target": target, "base": base, "edited": list(edited), "base_edited": list(base_edited),
            "roles": roles}


def animal_scene(rng, size1, size2) -> Case:
    (h1, w1), (h2, w2) = size1, size2
    bg1 = random_background(rng)
    bg2 = random_background(rng, ("flat", "gradient"), avoid=bg1)
    place, shape = choice(rng, PLACES), choice(rng, SHAPES)
    colour = pick_colour(rng, tuple(OBJECT_COLOURS), background_samples(bg1) + background_samples(bg2))
    free = [p for p in PLACES if p != place]
    ref1 = scene(size1, bg1, distractors(rng, size1, bg1, free, int(rng.integers(1, 4))))
    # Image 2's object is centred, as in a product photo (WORLD_VERSION 4); image 2's own background
    # keeps a returned image 2 from ever passing as the edit.
    ref2 = scene(size2, bg2, [shape_element(shape, colour, shape_box("center", h2, w2))])
    target = copy.deepcopy(ref1)
    target["elements"].append(shape_element(shape, colour, shape_box(place, h1, w1)))
    roles = {"scene_from": 1, "object": {"from": 2, "shape": shape, "colour": colour}, "place": place}
    plan = make_plan("animal_scene", [ref1, ref2], target, ref1, [len(target["elements"]) - 1], [], roles)
    return Case("animal_scene", [ref1, ref2], target, templates.animal_instruction(rng, shape, place), plan)


def person_scene(rng, size1, size2) -> Case:
    (h1, w1), (h2, w2) = size1, size2
    bg1 = random_background(rng, ("horizon", "horizon", "flat", "gradient"))
    bg2 = random_background(rng, ("flat", "gradient"), avoid=bg1)
    look = random_figure(rng, [bg1, bg2])
    # Medium keeps image 2's size (WORLD_VERSION 5): a figure put into a scene is as often left at its
    # own size as scaled, and small / large still ask for the rescale.
    side, scale = choice(rng, tuple(FIGURE_COLUMNS)), choice(rng, PERSON_SCALES)
    top_row = [p for p, col in zip(PLACES[:3], FIGURE_COLUMNS) if col != side]
    ref1 = scene(size1, bg1, distractors(rng, size1, bg1, top_row, int(rng.integers(0, 3))))
    ref2 = scene(size2, bg2, [placed(look, figure_box("medium", 0.5, h2, w2))])
    target = copy.deepcopy(ref1)
    target["elements"].append(placed(look, figure_box(scale, FIGURE_COLUMNS[side], h1, w1)))
    roles = {"scene_from": 1, "figure": {"from": 2, "garment": look["garment"], "skin": look["skin"]},
             "scale": scale, "side": side}
    plan = make_plan("person_scene", [ref1, ref2], target, ref1, [len(target["elements"]) - 1], [], roles)
    return Case("person_scene", [ref1, ref2], target, templates.person_instruction(rng, scale, side), plan)


def group_portrait(rng, size1, size2) -> Case:
    """Image 1's figure already stands on its side of its own picture; the figure of image 2 joins it
    on the other side (WORLD_VERSION 3: an edit of image 1, as Kontext's group edits are, rather than a
    re-rendering of both figures on a new background)."""
    (h1, w1), (h2, w2) = size1, size2
    bg1 = random_background(rng)
    bg2 = random_background(rng, avoid=bg1)
    look1 = random_figure(rng, [bg1])
    look2 = random_figure(rng, [bg2, bg1], avoid_garment=look1["garment"])
    side1 = choice(rng, ("left", "right"))
    side2 = "right" if side1 == "left" else "left"
    slot = GROUP_SLOTS["right"] - GROUP_SLOTS["left"] - 0.04  # keep a gap between the two figures
    figure1 = placed(look1, figure_box("medium", GROUP_SLOTS[side1], h1, w1, slot))
    ref1 = scene(size1, bg1, [figure1])
    ref2 = scene(size2, bg2, [placed(look2, figure_box("medium", 0.5, h2, w2))])
    base = scene(size1, bg1)
    target = scene(size1, bg1, [figure1, placed(look2, figure_box("medium", GROUP_SLOTS[side2], h1, w1, slot))])
    roles = {side1: {"from": 1, "garment": look1["garment"]}, side2: {"from": 2, "garment": look2["garment"]},
             "background": {"from": 1}}
    plan = make_plan("group_portrait", [ref1, ref2], target, base, [0, 1], [], roles)
    return Case("group_portrait", [ref1, ref2], target, templates.group_instruction(rng, side1), plan)


def style_transfer(rng, size1, size2) -> Case:
    (h1, w1), (h2, w2) = size1, size2
    mode = choice(rng, ("palette", "texture", "both"))
    objects = tuple(OBJECT_COLOURS)
    b1 = choice(rng, tuple(BACKGROUND_COLOURS))
    c1 = pick_colour(rng, objects, [rgb(b1)])
    b2 = pick_colour(rng, tuple(BACKGROUND_COLOURS), [rgb(b1)], 70.0)
    c2 = pick_colour(rng, objects, [rgb(b2), rgb(c1), rgb(b1)])  # it lands on image 1's background
    p2 = pick_colour(rng, objects, [rgb(b1), rgb(b2), rgb(c1), rgb(c2)])
    t2 = choice(rng, TEXTURES if mode == "palette" else TEXTURES[1:])
    layout = [(PLACES[i], choice(rng, SHAPES)) for i in rng.permutation(9)[:int(rng.integers(2, 5))]]
    ref1 = scene(size1, {"kind": "flat", "colour": b1},
                 [shape_element(s, c1, shape_box(p, h1, w1)) for p, s in layout])
    ref2 = scene(size2, {"kind": "flat", "colour": b2},
                 [shape_element(choice(rng, SHAPES), c2, shape_box(PLACES[i], h2, w2),
                                t2, p2 if t2 != "solid" else None)
                  for i in rng.permutation(9)[:int(rng.integers(2, 4))]])
    # The style goes onto image 1's shapes; its background stays (WORLD_VERSION 3: an edit of image 1).
    background, colour = b1, (c1 if mode == "texture" else c2)
    texture, colour2 = ("solid", None) if mode == "palette" else (t2, p2)
    target = scene(size1, {"kind": "flat", "colour": background},
                   [shape_element(s, colour, shape_box(p, h1, w1), texture, colour2) for p, s in layout])
    every = list(range(len(layout)))
    roles = {"mode": mode, "layout_from": 1, "style_from": 2, "background": background, "colour": colour,
             "texture": texture, "colour2": colour2}
    plan = make_plan("style_transfer", [ref1, ref2], target, ref1, every, every, roles)
    return Case("style_transfer", [ref1, ref2], target, templates.style_instruction(rng, mode), plan)


def clothing_replace(rng, size1, size2) -> Case:
    (h1, w1), (h2, w2) = size1, size2
    bg1 = random_background(rng)
    bg2 = random_background(rng, avoid=bg1)
    look1 = random_figure(rng, [bg1, bg2])
    look2 = random_figure(rng, [bg1, bg2], avoid_garment=look1["garment"])
    # The new garment must still stand out from the figure it goes onto.
    if any(colour_distance(rgb(look2["garment"]), rgb(look1[k])) < 90.0 for k in ("skin", "legs")):
        raise NoChoice("garment too close to skin or legs")
    side1 = choice(rng, tuple(FIGURE_COLUMNS))
    side2 = choice(rng, tuple(c for c in FIGURE_COLUMNS if c != side1))  # image 2 is never the answer
    scale1, scale2 = choice(rng, ("medium", "large")), choice(rng, ("small", "medium", "large"))
    top_row = [p for p, col in zip(PLACES[:3], FIGURE_COLUMNS) if col != side1]
    elements = distractors(rng, size1, bg1, top_row, int(rng.integers(0, 2)))
    ref1 = scene(size1, bg1, elements + [placed(look1, figure_box(scale1, FIGURE_COLUMNS[side1], h1, w1))])
    ref2 = scene(size2, bg2, [placed(look2, figure_box(scale2, FIGURE_COLUMNS[side2], h2, w2))])
    target = copy.deepcopy(ref1)
    dressed = target["elements"][-1]
    dressed.update(garment=look2["garment"], texture=look2["texture"], colour2=look2["colour2"])
    index = len(target["elements"]) - 1
    roles = {"figure_from": 1, "garment_from": 2, "pose": look1["pose"],
             "garment": {k: look2[k] for k in ("garment", "texture", "colour2")}}
    plan = make_plan("clothing_replace", [ref1, ref2], target, ref1, [index], [index], roles)
    return Case("clothing_replace", [ref1, ref2], target, templates.clothing_instruction(rng), plan)


def two_figures_scene(rng, size1, size2, size3) -> Case:
    """Three references: the figures of images 2 and 3 join image 1's scene, one on each side (the
    instruction says which). Image 1 keeps everything it has; only the two figures are new."""
    (h1, w1), (h2, w2), (h3, w3) = size1, size2, size3
    bg1 = random_background(rng, ("horizon", "horizon", "flat", "gradient"))
    bg2 = random_background(rng, ("flat", "gradient"), avoid=bg1)
    bg3 = random_background(rng, ("flat", "gradient"), avoid=bg1)
    look2 = random_figure(rng, [bg1, bg2])
    look3 = random_figure(rng, [bg1, bg3], avoid_garment=look2["garment"])
    side2 = choice(rng, ("left", "right"))
    side3 = "right" if side2 == "left" else "left"
    slot = GROUP_SLOTS["right"] - GROUP_SLOTS["left"] - 0.04  # keep a gap between the two figures
    # at most one small shape, top middle: clear of both figures' heads
    ref1 = scene(size1, bg1, distractors(rng, size1, bg1, PLACES[1:2], int(rng.integers(0, 2))))
    ref2 = scene(size2, bg2, [placed(look2, figure_box("medium", 0.5, h2, w2))])
    ref3 = scene(size3, bg3, [placed(look3, figure_box("medium", 0.5, h3, w3))])
    target = copy.deepcopy(ref1)
    target["elements"] += [placed(look2, figure_box("medium", GROUP_SLOTS[side2], h1, w1, slot)),
                           placed(look3, figure_box("medium", GROUP_SLOTS[side3], h1, w1, slot))]
    n = len(target["elements"])
    roles = {"scene_from": 1, side2: {"from": 2, "garment": look2["garment"]},
             side3: {"from": 3, "garment": look3["garment"]}}
    plan = make_plan("two_figures_scene", [ref1, ref2, ref3], target, ref1, [n - 2, n - 1], [], roles)
    return Case("two_figures_scene", [ref1, ref2, ref3], target, templates.two_figures_instruction(rng, side2), plan)


BUILDERS = {"animal_scene": animal_scene, "person_scene": person_scene, "group_portrait": group_portrait,
            "style_transfer": style_transfer, "clothing_replace": clothing_replace,
            "two_figures_scene": two_figures_scene}
