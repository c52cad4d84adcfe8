"""Every prompt the judge sends, in one place, under one version.

Change any text here and bump ``PROMPT_VERSION``: the version is part of every cache key and is
recorded in every verdict, so answers to different wordings never mix.

Image order (fixed, and stated to the model in the message itself):
  image 1 = reference 1, image 2 = reference 2, image 3 = the edited output.
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


def question_text(question: str, instruction: str) -> str:
    return QUESTIONS[question].format(instruction=instruction)


def score_question_text(aspect: str, instruction: str) -> str:
    return SCORE_QUESTIONS[aspect].format(instruction=instruction)
