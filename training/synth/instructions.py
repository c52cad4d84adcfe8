"""Asking the LLM for an instruction and an edit plan, and holding it to the JSON schema.

A reply that is not JSON, breaks the schema, names another task or repeats an instruction already
used for the task is answered with the reason and asked again, up to ``max_plan_attempts`` times;
then the pair is given up (:class:`PlanRejected`, logged and recorded, not retried on rerun).
"""
from __future__ import annotations

import json
import logging
import re
import threading
from functools import lru_cache
from pathlib import Path

from judge.images import fit, png_data_url, to_pil

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).resolve().parent / "plan_schema.json"

TASK_BRIEFS = {
    "animal_scene": "Animal-scene composition: insert the animal from image 2 into the scene of image 1, "
                    "preserving the scene, a plausible scale, the scene's lighting and perspective.",
    "person_scene": "Person-scene insertion: place the person from image 2 into the background of image 1 "
                    "with consistent perspective, scale and lighting, keeping the person's identity.",
    "group_portrait": "Group portrait: merge the person of image 1 and the person of image 2 into one coherent "
                      "group photo, keeping both identities recognisable.",
    "style_transfer": "Style transfer: render the content of image 1 in the visual style of image 2 (palette, "
                      "texture, medium, brushwork) while keeping image 1's content and layout.",
    "clothing_replace": "Clothing replacement: dress the person of image 1 in the garment shown in image 2, "
                        "keeping the person's identity, pose and background.",
}

SYSTEM_PROMPT = (
    "You write training data for dual-reference, instruction-guided image editing. You see image 1 "
    "and image 2 and a task. Write one natural, specific editing instruction a user would type "
    "(refer to the images as 'image 1' and 'image 2'; name what is in them), and a structured edit "
    "plan of the semantic constraints (placement, cross-image consistency, identity preservation). "
    "Answer with one JSON object that fits this JSON schema, and nothing else:\n{schema}"
)


class PlanRejected(RuntimeError):
    """The LLM gave no acceptable plan within the attempts; the pair is skipped."""


@lru_cache(maxsize=1)
def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    schema = load_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def normalize_instruction(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def parse_reply(text: str) -> dict:
    """The JSON object in a reply (tolerating a ```json fence); ValueError with the reason otherwise."""
    text = (text or "").strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"the reply is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(value, dict):
        raise ValueError("the reply must be one JSON object")
    return value


def schema_errors(plan: dict, task: str) -> list[str]:
    """Readable schema violations (path: message), plus a task mismatch; empty when valid."""
    errors = sorted(_validator().iter_errors(plan), key=lambda e: (len(e.path), list(map(str, e.path))))
    out = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors[:5]]
    if not out and plan.get("task") != task:
        out.append(f"task: must be {task!r} (the task asked for), got {plan.get('task')!r}")
    return out


class InstructionRegistry:
    """Instructions in use per task, so no two samples of a task share one (thread-safe)."""

    def __init__(self):
        self._used: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def claim(self, task: str, instruction: str) -> bool:
        key = normalize_instruction(instruction)
        with self._lock:
            used = self._used.setdefault(task, set())
            if key in used:
                return False
            used.add(key)
            return True


def user_content(task: str, image1, image2, max_side: int | None) -> list[dict]:
    parts = [{"type": "text", "text": f"Task: {task}. {TASK_BRIEFS[task]}\nImage 1:"}]
    for label, image in (("Image 2:", image1), (None, image2)):
        parts.append({"type": "image_url", "image_url": {"url": png_data_url(fit(to_pil(image), max_side))}})
        if label:
            parts.append({"type": "text", "text": label})
    parts.append({"type": "text", "text": f"Reply with the JSON object for task {task!r}."})
    return parts


def request_plan(chat, task: str, image1, image2, registry: InstructionRegistry, attempts: int) -> tuple[str, dict]:
    """(instruction, plan without the instruction) from ``chat`` (a ChatClient)."""
    schema = load_schema()
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT.format(schema=json.dumps(schema))},
        {"role": "user", "content": user_content(task, image1, image2, chat.profile.image_max_side)},
    ]
    problems = []
    for attempt in range(attempts):
        reply = chat.complete(messages, schema)
        try:
            plan = parse_reply(reply)
            errors = schema_errors(plan, task)
            if errors:
                raise ValueError("the JSON does not fit the schema: " + "; ".join(errors))
            if not registry.claim(task, plan["instruction"]):
                raise ValueError(f"the instruction {plan['instruction']!r} is already used for another pair; "
                                 "write a different instruction specific to these two images")
        except ValueError as e:
            problems.append(str(e))
            log.info("plan attempt %d/%d for %s rejected: %s", attempt + 1, attempts, task, e)
            messages = messages + [
                {"role": "assistant", "content": reply[:4000]},
                {"role": "user", "content": f"That reply was not accepted: {e}. Reply again with one JSON "
                                            "object that fits the schema, nothing else."},
            ]
            continue
        instruction = plan.pop("instruction").strip()
        return instruction, plan
    raise PlanRejected(f"no acceptable plan in {attempts} attempts; last problem: {problems[-1]}")
