"""Single-reference edits (task ``single_edit``): the toy base editor's pretraining data.

One picture of a few shapes (each shape class at most once, so "the circle" is unambiguous) and
one of four operations: recolour, move, add, remove. The plan has the same schema as the dual
tasks (training/toy/tasks.py); ``roles`` says the operation and its arguments.
"""
from __future__ import annotations

import copy

from judge.toy.scene import OBJECT_COLOURS, PLACES, SHAPES, TEXTURES, background_samples, rgb, shape_box

from . import templates
from .tasks import Case, choice, make_plan, pick_colour, random_background, scene, shape_element

OPERATIONS = ("recolour", "move", "add", "remove")


def _shapes(rng, size, background, count) -> tuple[list[dict], list[str]]:
    h, w = size
    places = [PLACES[i] for i in rng.permutation(9)[:count]]
    kinds = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:count]]
    bg = background_samples(background)
    elements = []
    for place, kind in zip(places, kinds):
        colour = pick_colour(rng, tuple(OBJECT_COLOURS), bg)
        texture, colour2 = "solid", None
        if rng.random() < 0.2:
            texture = choice(rng, TEXTURES[1:])
            colour2 = pick_colour(rng, tuple(OBJECT_COLOURS), bg + [rgb(colour)])
        elements.append(shape_element(kind, colour, shape_box(place, h, w), texture, colour2))
    return elements, places


def single_edit(rng, size1, size2=None) -> Case:
    h, w = size1
    background = random_background(rng)
    op = choice(rng, OPERATIONS)
    elements, places = _shapes(rng, size1, background, int(rng.integers(2, 5)))
    ref = scene(size1, background, elements)
    target = copy.deepcopy(ref)
    free = [p for p in PLACES if p not in places]
    index = int(rng.integers(len(elements)))
    chosen = elements[index]
    roles = {"op": op, "shape": chosen["shape"], "colour": chosen["colour"], "place": places[index]}
    if op == "recolour":
        away = background_samples(background) + [rgb(chosen["colour"])]
        if chosen["colour2"]:
            away.append(rgb(chosen["colour2"]))
        new = pick_colour(rng, tuple(OBJECT_COLOURS), away)
        target["elements"][index]["colour"] = new
        roles["new_colour"] = new
        edited, base_edited = [index], [index]
        text = templates.single_instruction(rng, op, shape=chosen["shape"], old=chosen["colour"], colour=new)
    elif op == "move":
        place = choice(rng, free)
        target["elements"][index]["box"] = shape_box(place, h, w)
        roles["new_place"] = place
        edited, base_edited = [index], [index]
        text = templates.single_instruction(rng, op, shape=chosen["shape"], old=chosen["colour"], place=place)
    elif op == "add":
        kind = choice(rng, [s for s in SHAPES if s not in {e["shape"] for e in elements}])
        place = choice(rng, free)
        colour = pick_colour(rng, tuple(OBJECT_COLOURS), background_samples(background))
        target["elements"].append(shape_element(kind, colour, shape_box(place, h, w)))
        roles = {"op": op, "shape": kind, "colour": colour, "place": place}
        edited, base_edited = [len(elements)], []
        text = templates.single_instruction(rng, op, shape=kind, colour=colour, place=place)
    else:  # remove
        del target["elements"][index]
        edited, base_edited = [], [index]
        text = templates.single_instruction(rng, op, shape=chosen["shape"], old=chosen["colour"])
    plan = make_plan("single_edit", [ref], target, ref, edited, base_edited, roles)
    return Case("single_edit", [ref], target, text, plan)
