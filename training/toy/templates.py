"""Instruction templates of the toy world: several phrasings per task, filled from the plan.

References are named the way people name them ("image 2", "the second picture", ...), one naming
style per instruction. ``vocabulary()`` lists every word an instruction can contain, so a tokenizer
for the tiny text encoders can be built locally from this grammar.
"""
from __future__ import annotations

import re

from judge.toy.scene import BACKGROUND_COLOURS, OBJECT_COLOURS, PLACES, SHAPES

REF_NAMES = (("image 1", "image 2"), ("the first image", "the second image"),
             ("the first picture", "the second picture"))

PLACE_PHRASES = {
    "top left": ("at the top left", "in the top left corner"),
    "top": ("at the top", "at the top middle"),
    "top right": ("at the top right", "in the top right corner"),
    "left": ("on the left", "at the middle left"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the middle right"),
    "bottom left": ("at the bottom left", "in the bottom left corner"),
    "bottom": ("at the bottom", "at the bottom middle"),
    "bottom right": ("at the bottom right", "in the bottom right corner"),
}
SIDE_PHRASES = {"left": ("on the left", "at the left"), "center": ("in the middle", "at the center"),
                "right": ("on the right", "at the right")}
SCALE_WORDS = {"small": ("small", "little"), "medium": ("medium", "regular"), "large": ("large", "big")}
ANIMAL_NOUNS = ("animal", "creature", "object")  # or the shape's own name
PERSON_NOUNS = (("person", "people"), ("figure", "figures"))

TEMPLATES = {
    "animal_scene": (
        "Put the {obj} from {r2} into {r1}, {place}.",
        "Place the {obj} of {r2} {place} of {r1}.",
        "Insert the {obj} shown in {r2} into the scene of {r1}, {place}.",
        "Take the {obj} from {r2} and add it to {r1} {place}.",
        "Add the {obj} in {r2} to {r1} so that it sits {place}.",
    ),
    "person_scene": (
        "Put the {obj} from {r2} into {r1}, {scale} and {side}.",
        "Place a {scale} version of the {obj} in {r2} {side} of {r1}.",
        "Add the {obj} of {r2} to the scene in {r1}: {scale}, standing {side}.",
        "Insert the {obj} shown in {r2} into {r1} {side}, drawn {scale}.",
    ),
    "group_portrait": (
        "Make a group picture: the {obj} from {r1} on the {a} and the {obj} from {r2} on the {b}{bg}.",
        "Put the {objs} of {r1} and {r2} side by side, the one from {r1} on the {a}{bg}.",
        "Create a portrait of both {objs}{bg}, with the {obj} of {r2} on the {b}.",
        "Place the {obj} from {r2} on the {b} and the {obj} from {r1} on the {a}{bg}.",
    ),
    "clothing_replace": (
        "Dress the {obj} in {r1} in the clothes of the {obj} in {r2}.",
        "Replace the shirt of the {obj} in {r1} with the one worn in {r2}.",
        "Give the {obj} of {r1} the outfit from {r2}, keeping the pose.",
        "Swap the top: the {obj} in {r1} should wear the shirt from {r2}.",
        "Change the clothes of the {obj} in {r1} to match {r2}.",
    ),
}
# two_figures_scene (three references). Kept out of vocabulary(): the toy base's tokenizer is built from
# it and must not change, so "3" / "third" reach that tokenizer as <unk>; every instruction still
# names the side of image 2's figure in known words, which is all the task needs.
REF_NAMES_3 = (("image 1", "image 2", "image 3"), ("the first image", "the second image", "the third image"),
               ("the first picture", "the second picture", "the third picture"))
TWO_FIGURES_TEMPLATES = (
    "Put the {obj} from {r2} on the {a} and the {obj} from {r3} on the {b} of {r1}.",
    "Place the {objs} of {r2} and {r3} into the scene of {r1}, the one from {r2} on the {a}.",
    "Add the {obj} of {r3} on the {b} and the {obj} of {r2} on the {a}, in {r1}.",
    "Insert the {objs} from {r2} and {r3} into {r1} side by side, the {obj} from {r2} on the {a}.",
)
GROUP_BACKGROUNDS = (" in front of the background of {r1}", " with the background of {r1}", "")
STYLE_TEMPLATES = {
    "palette": (
        "Repaint the shapes of {r1} with the colours of {r2}.",
        "Apply the colour palette of {r2} to the shapes of {r1}.",
        "Use the colours from {r2} for the shapes in {r1}.",
        "Recolour the objects of {r1} so that they use the palette of {r2}.",
    ),
    "texture": (
        "Give the shapes in {r1} the pattern of {r2}.",
        "Apply the texture of {r2} to the shapes of {r1}.",
        "Fill the objects of {r1} with the pattern from {r2}, keep their colours.",
        "Use the texture of {r2} on the shapes in {r1}.",
    ),
    "both": (
        "Restyle {r1} in the style of {r2}, colours and pattern.",
        "Transfer the style of {r2}, both palette and texture, onto {r1}.",
        "Render the layout of {r1} in the style of {r2}.",
        "Make {r1} look like {r2}: same colours and pattern, same shapes and places.",
    ),
}
SINGLE_TEMPLATES = {
    "recolour": (
        "Make the {shape} {colour}.",
        "Change the colour of the {shape} to {colour}.",
        "Paint the {old} {shape} {colour}.",
        "Recolour the {shape} in {colour}.",
    ),
    "move": (
        "Move the {shape} {place}.",
        "Put the {shape} {place} instead.",
        "Shift the {old} {shape} {place}.",
    ),
    "add": (
        "Add a {colour} {shape} {place}.",
        "Draw a {colour} {shape} {place}.",
        "Place a {colour} {shape} {place}.",
    ),
    "remove": (
        "Remove the {shape}.",
        "Delete the {old} {shape}.",
        "Erase the {shape} from the picture.",
        "Take away the {shape}.",
    ),
}


def _choice(rng, options):
    return options[int(rng.integers(len(options)))]


def _finish(text: str) -> str:
    return text[0].upper() + text[1:]


def _refs(rng) -> dict:
    r1, r2 = _choice(rng, REF_NAMES)
    return {"r1": r1, "r2": r2}


def animal_instruction(rng, shape: str, place: str) -> str:
    obj = _choice(rng, ANIMAL_NOUNS + (shape,))
    return _finish(_choice(rng, TEMPLATES["animal_scene"]).format(
        obj=obj, place=_choice(rng, PLACE_PHRASES[place]), **_refs(rng)))


def person_instruction(rng, scale: str, side: str) -> str:
    obj, _ = _choice(rng, PERSON_NOUNS)
    return _finish(_choice(rng, TEMPLATES["person_scene"]).format(
        obj=obj, scale=_choice(rng, SCALE_WORDS[scale]), side=_choice(rng, SIDE_PHRASES[side]), **_refs(rng)))


def group_instruction(rng, side_of_1: str) -> str:
    obj, objs = _choice(rng, PERSON_NOUNS)
    refs = _refs(rng)
    bg = _choice(rng, GROUP_BACKGROUNDS).format(**refs)
    other = "right" if side_of_1 == "left" else "left"
    return _finish(_choice(rng, TEMPLATES["group_portrait"]).format(
        obj=obj, objs=objs, a=side_of_1, b=other, bg=bg, **refs))


def style_instruction(rng, mode: str) -> str:
    return _finish(_choice(rng, STYLE_TEMPLATES[mode]).format(**_refs(rng)))


def clothing_instruction(rng) -> str:
    obj, _ = _choice(rng, PERSON_NOUNS)
    return _finish(_choice(rng, TEMPLATES["clothing_replace"]).format(obj=obj, **_refs(rng)))


def two_figures_instruction(rng, side_of_2: str) -> str:
    obj, objs = _choice(rng, PERSON_NOUNS)
    r1, r2, r3 = _choice(rng, REF_NAMES_3)
    other = "right" if side_of_2 == "left" else "left"
    return _finish(_choice(rng, TWO_FIGURES_TEMPLATES).format(obj=obj, objs=objs, a=side_of_2, b=other,
                                                              r1=r1, r2=r2, r3=r3))


def single_instruction(rng, op: str, **slots) -> str:
    if "place" in slots:
        slots["place"] = _choice(rng, PLACE_PHRASES[slots["place"]])
    return _finish(_choice(rng, SINGLE_TEMPLATES[op]).format(**slots))


def vocabulary() -> list[str]:
    """Every lower-case word and punctuation mark an instruction can contain, sorted."""
    texts = [t for group in (TEMPLATES, STYLE_TEMPLATES, SINGLE_TEMPLATES) for ts in group.values() for t in ts]
    texts += list(GROUP_BACKGROUNDS)
    texts += [" ".join(pair) for pair in REF_NAMES]
    texts += [p for ps in PLACE_PHRASES.values() for p in ps] + [p for ps in SIDE_PHRASES.values() for p in ps]
    texts += [w for ws in SCALE_WORDS.values() for w in ws] + list(ANIMAL_NOUNS) + [" ".join(p) for p in PERSON_NOUNS]
    texts += list(SHAPES) + list(OBJECT_COLOURS) + list(BACKGROUND_COLOURS) + ["small medium large"] + list(PLACES)
    words = set()
    for text in texts:
        words.update(re.findall(r"[a-z0-9]+|[.,:]", re.sub(r"\{[a-z0-9]+\}", " ", text.lower())))
    return sorted(words)
