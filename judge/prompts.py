"""Every prompt the judge sends, in one place, under one version.

Change any text here and bump ``PROMPT_VERSION``: the version is part of every cache key and is
recorded in every verdict, so answers to different wordings never mix.

Image order (fixed, and stated to the model in the message itself):
  image 1 = reference 1, image 2 = reference 2, image 3 = the edited output.
With k references (three-reference tasks): image j = reference j for j <= k, image k+1 = the output,
and the consistency question names every reference (:func:`image_labels`, :func:`system_yes_no`,
:func:`question_text`); the two-reference wording below is the k = 2 case, sent word for word.
In the single-reference 0-10 mode: image 1 = the source image, image 2 = the edited output.
"""
from __future__ import annotations

PROMPT_VERSION = "dualref-judge-v1"

# --- The paper's three yes/no questions (Sec. 3.3) --------------------------------------------

IMAGE_LABELS = (
    "Image 1 (reference 1):",
    "Image 2 (reference 2):",
    "Image 3 (the edited output):",
)

SYSTEM_YES_NO = (
    "You judge image edits. You are shown three images in this fixed order: Image 1 is the first "
    "reference, Image 2 is the second reference, and Image 3 is the edited output that an editing "
    "model produced from both references by following an instruction. Answer the question about "
    "Image 3. Your reply must begin with a single word, Yes or No, followed by at most one short "
    "sentence explaining why. Do not give a score."
)

# Keys are the Verdict field names (judge.verdict.QUESTIONS), in that order.
QUESTIONS = {
    "fidelity": (
        'The instruction was: "{instruction}"\n'
        "Question: Does Image 3 follow this instruction?"
    ),
    "consistency": (
        'The instruction was: "{instruction}"\n'
        "Question: Does Image 3 faithfully carry over the visual attributes it takes from both "
        "references (identity, appearance, clothing, colours or style, as the instruction "
        "requires) from Image 1 and from Image 2?"
    ),
    "realism": (
        "Question: Is Image 3 visually coherent and realistic, free of artifacts such as "
        "distorted or duplicated parts, visible seams, or pasted-on regions?"
    ),
}

# Sent after an answer that did not begin with yes/no (the previous reply is kept in the chat).
REASK_YES_NO = "Your reply must begin with Yes or No. Answer again: Yes or No, then one sentence."

# --- GEdit-Bench / VIEScore-style 0-10 mode (single-reference regression, paper Table 1) -------
# Overall = sqrt(SC * PQ); SC and PQ are each the minimum of the two sub-scores asked for.

SCORE_IMAGE_LABELS = ("Image 1 (the source image):", "Image 2 (the edited image):")

SYSTEM_SCORE = (
    "You are an expert evaluator of AI image editing. Rate strictly and reply with JSON only, in "
    'the form {"score": [<number>, <number>], "reasoning": "<one or two sentences>"}, each '
    "number from 0 to 10."
)

SCORE_QUESTIONS = {
    "semantic_consistency": (
        'Image 1 is the source image and Image 2 is its edited version. The instruction was: "{instruction}"\n'
        "Give two scores from 0 to 10. The first rates how well Image 2 carries out the "
        "instruction (0: not at all, 10: exactly). The second rates how little else changed "
        "(0: Image 2 is an unrelated image, 10: only what the instruction asks for changed)."
    ),
    "perceptual_quality": (
        "Image 2 is an AI-edited image. Give two scores from 0 to 10. The first rates how natural "
        "the image looks (lighting, perspective, proportions; 0: clearly unnatural, 10: "
        "entirely natural). The second rates freedom from artifacts such as distortions, blur, "
        "seams or broken parts (0: severe artifacts, 10: none)."
    ),
}

REASK_SCORE = 'Reply with JSON only: {"score": [<0-10>, <0-10>], "reasoning": "..."}.'


# --- k references (k != 2): the same three questions, every image numbered -------------------

_COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                9: "nine", 10: "ten", 11: "eleven"}


def _count(n: int) -> str:
    return _COUNT_WORDS.get(n, str(n))


def _images_list(references: int) -> str:
    """'Image 1, from Image 2 and from Image 3' style list of every reference."""
    names = [f"Image {k}" for k in range(1, references + 1)]
    return "from " + (names[0] if references == 1 else ", from ".join(names[:-1]) + " and from " + names[-1])


def _check_references(references: int) -> int:
    references = int(references)
    if references < 2:
        raise ValueError(f"the three-question protocol needs two or more references, got {references}")
    return references


def image_labels(references: int = 2) -> tuple[str, ...]:
    """The label sent before each image: the references in order, then the output."""
    if _check_references(references) == 2:
        return IMAGE_LABELS
    return tuple(f"Image {k} (reference {k}):" for k in range(1, references + 1)) + (
        f"Image {references + 1} (the edited output):",)


def system_yes_no(references: int = 2) -> str:
    if _check_references(references) == 2:
        return SYSTEM_YES_NO
    out = references + 1
    order = ", ".join(f"Image {k} is reference {k}" for k in range(1, references + 1))
    return (f"You judge image edits. You are shown {_count(out)} images in this fixed order: {order}, and "
            f"Image {out} is the edited output that an editing model produced from all {_count(references)} "
            f"references by following an instruction. Answer the question about Image {out}. Your reply must "
            "begin with a single word, Yes or No, followed by at most one short sentence explaining why. Do "
            "not give a score.")


def question_templates(references: int = 2) -> dict[str, str]:
    """:data:`QUESTIONS` for ``references`` references (the same dict for two)."""
    if _check_references(references) == 2:
        return QUESTIONS
    out = f"Image {references + 1}"
    return {
        "fidelity": (
            'The instruction was: "{instruction}"\n'
            f"Question: Does {out} follow this instruction?"
        ),
        "consistency": (
            'The instruction was: "{instruction}"\n'
            f"Question: Does {out} faithfully carry over the visual attributes it takes from all "
            f"{_count(references)} references (identity, appearance, clothing, colours or style, as the "
            f"instruction requires) {_images_list(references)}?"
        ),
        "realism": (
            f"Question: Is {out} visually coherent and realistic, free of artifacts such as "
            "distorted or duplicated parts, visible seams, or pasted-on regions?"
        ),
    }


def question_text(question: str, instruction: str, references: int = 2) -> str:
    return question_templates(references)[question].format(instruction=instruction)


def score_question_text(aspect: str, instruction: str) -> str:
    return SCORE_QUESTIONS[aspect].format(instruction=instruction)
