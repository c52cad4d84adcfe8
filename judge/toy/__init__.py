"""The programmatic judge of the DualShapes toy world (``load_judge("toy")``).

It answers the paper's three questions from pixels, using the sample's plan (training/toy/tasks.py)
to re-render the exact target and to know which pixels the instruction may change:

- fidelity: the instructed edit happened (right object, place, size; for style and garments the
  change took place on image 1's layout / figure; for group portraits each figure is on its side;
  for single edits also the instructed colour and the emptied old spot).
- consistency: attributes of both references are where the plan puts them (image 1's scene
  untouched outside the edit, no stray object in it; colours / patterns / skin from their source).
- realism: no artifacts, judged from the output alone: blank, per-pixel noise, stripes, blur,
  colours the world cannot contain, an edited object cut off.

Each check is a measured value against a threshold (``THRESHOLDS``; override any of them with
``ToyJudge(thresholds={...})``). Binary mode (the paper's) answers 1 when all checks of a question
pass; probability mode gives the smallest of the checks' logistic scores, a graded value in [0, 1]
that crosses 0.5 at the threshold. Colour matching is tolerant (nearest expected colour, mask
overlap, shares of pixels), so a VAE's soft edges and small colour shifts pass while misplacement,
wrong colours and noise do not. Calibration: tests/test_toy_judge.py.

Score mode (``score`` / ``submit_score``, the paper's Table 1) is the toy stand-in for a
GEdit-Bench / VIEScore 0-10 judge, derived from the same checks in probability mode:
SC = 10 x min(fidelity, consistency) (instruction carried out, nothing else changed), PQ = 10 x
realism (naturalness: blank / off-palette / broken; artifacts: speckle / banding / blur), each
with its two sub-scores kept as a VLM's two numbers would be.
"""
from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future

import numpy as np
from PIL import Image

from . import metrics as m
from ..base import Judge
from ..edit_score import EditScore
from ..images import to_pil
from .checks import Measure, PlanRenders
from ..verdict import MODES, QUESTIONS, JudgeRequest, Verdict

PLAN_VERSION = 1
# name: (threshold, logistic scale for probability mode, True if larger values are better)
THRESHOLDS = {
    "presence": (0.65, 0.06, True),    # IoU of what differs from the underlay vs the planned mask
    "appearance": (0.7, 0.06, True),   # balanced accuracy of the planned colours in each edited part
    "order": (0.0, 0.05, True),        # group portrait: each side fits its own figure better than the other
    "preserve": (0.9, 0.02, True),     # share of pixels outside the edit that kept their colour
    "stray": (0.25, 0.05, False),      # unplanned change outside the edit, in small-object areas
    "vacated": (0.8, 0.05, True),      # share of a moved/removed object's old spot now showing background
    "changed": (0.7, 0.06, True),      # share of to-be-changed pixels closer to the target than to image 1
    "blank": (0.99, 0.005, False),     # share of pixels at the mean colour
    "speckle": (8.5, 1.0, False),      # mean distance to the closest neighbour (per-pixel noise)
    "banding": (0.5, 0.08, False),    # share of rows/columns crossed by stripes in plain background
    # median one-pixel share of strong colour ramps (blur): calibration heavy blur <= 0.393, VAE-like >= 0.535
    "sharpness": (0.40, 0.03, True),
    "off_palette": (0.02, 0.004, False),  # share of flat pixels in no colour of the world
    "broken": (0.5, 0.1, False),       # 1 when an edited object is cut off along a straight line
}
TASK_CHECKS = {  # task: (fidelity checks, consistency checks)
    "animal_scene": (("presence",), ("preserve", "stray", "appearance")),
    "person_scene": (("presence",), ("preserve", "stray", "appearance")),
    "group_portrait": (("presence", "order"), ("preserve", "stray", "appearance")),
    "style_transfer": (("presence", "changed"), ("presence", "appearance", "preserve")),
    "clothing_replace": (("presence", "changed"), ("preserve", "stray", "appearance")),
    "single_edit": (("presence", "appearance", "vacated"), ("preserve", "stray")),
    # three references: image 2's and image 3's figures join image 1's scene, each on its side
    "two_figures_scene": (("presence", "order"), ("preserve", "stray", "appearance")),
}
REALISM_CHECKS = ("blank", "speckle", "banding", "sharpness", "off_palette", "broken")
NATURALNESS_CHECKS = ("blank", "off_palette", "broken")  # score mode: PQ's first number; the rest are artifacts
CACHE_SIZE = 512  # plans whose renders are kept (DDPO judges each prompt several times)


def _pixels(image, what: str, size) -> np.ndarray:
    """HxWx3 float32 at ``size`` (H, W); bilinear resize when the picture has another size."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
        if tuple(image.shape[:2]) == tuple(size):
            return image.astype(np.float32)
        image = Image.fromarray(image)
    try:
        pil = to_pil(image)
    except (ValueError, TypeError) as e:
        raise ValueError(f"toy judge: cannot read {what}: {e}") from None
    if (pil.height, pil.width) != tuple(size):
        pil = pil.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(pil, dtype=np.float32)


def score(value: float, spec) -> tuple[bool, float]:
    """(passed, logistic probability) of one measured value under ``(threshold, scale, higher)``."""
    limit, scale, higher = spec
    z = (value - limit) / scale * (1 if higher else -1)
    return (value >= limit if higher else value <= limit), 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))


class ToyJudge(Judge):
    """Answers fidelity / consistency / realism for toy-world samples from pixels and the plan."""

    name = "toy"

    def __init__(self, mode: str = "binary", thresholds: dict | None = None, verify_references: bool = True,
                 cache_size: int = CACHE_SIZE):
        if mode not in MODES:
            raise ValueError(f"toy judge: unknown mode {mode!r}; use one of {', '.join(MODES)}")
        unknown = set(thresholds or {}) - set(THRESHOLDS)
        if unknown:
            raise ValueError(f"toy judge: unknown threshold(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(THRESHOLDS)}")
        self.mode = mode
        self.thresholds = dict(THRESHOLDS)
        for key, value in (thresholds or {}).items():
            self.thresholds[key] = (float(value),) + THRESHOLDS[key][1:]
        self.verify_references = verify_references
        self._cache: OrderedDict[str, PlanRenders] = OrderedDict()
        self._cache_size = int(cache_size)
        self._lock = threading.Lock()

    def judge(self, request: JudgeRequest) -> Verdict:
        start = time.perf_counter()
        measured = self.measure(request)
        scores, answers = {}, {}
        for question in QUESTIONS:
            results = [(name, text) + score(value, self.thresholds[name]) for name, value, text in measured[question]]
            failed = [text for _, text, passed, _ in results if not passed]
            if self.mode == "binary":
                scores[question] = 0.0 if failed else 1.0
            else:
                scores[question] = min((p for *_, p in results), default=1.0)
            answers[question] = ("no: " + "; ".join(failed)) if failed else \
                ("yes: " + "; ".join(text for _, text, _, _ in results))
        return Verdict(**scores, judge=self.name, mode=self.mode, answers=answers,
                       prompt_version=f"toy-plan-v{PLAN_VERSION}", latency_s=time.perf_counter() - start,
                       sample_id=request.sample_id)

    def score(self, request: JudgeRequest) -> EditScore:
        """The 0-10 Table-1 score (see the module docstring); raises ValueError like ``judge``."""
        start = time.perf_counter()
        measured = self.measure(request)
        # ``score`` below is the module's check-scoring function (this method only shares its name)
        prob = {q: {name: score(value, self.thresholds[name])[1] for name, value, _ in measured[q]} for q in QUESTIONS}

        def ten(values) -> float:  # the weakest check decides, as in probability mode
            return round(10.0 * min(values, default=1.0), 3)

        realism = prob["realism"]
        sc = [ten(prob["fidelity"].values()), ten(prob["consistency"].values())]
        pq = [ten(p for n, p in realism.items() if n in NATURALNESS_CHECKS),
              ten(p for n, p in realism.items() if n not in NATURALNESS_CHECKS)]
        answers = {aspect: ", ".join(f"{n}={p:.2f}" for q in questions for n, p in prob[q].items())
                   for aspect, questions in (("semantic_consistency", ("fidelity", "consistency")),
                                             ("perceptual_quality", ("realism",)))}
        return EditScore(min(sc), min(pq), judge=self.name, sub_scores={"semantic_consistency": sc,
                         "perceptual_quality": pq}, answers=answers, prompt_version=f"toy-plan-v{PLAN_VERSION}-score",
                         latency_s=time.perf_counter() - start, sample_id=request.sample_id)

    def submit_score(self, request: JudgeRequest) -> "Future[EditScore]":
        """``score`` as a settled Future (the toy judge takes milliseconds), like the HTTP judge's."""
        future: Future = Future()
        try:
            future.set_result(self.score(request))
        except Exception as e:  # ValueError for a request without a usable plan: the caller reports it
            future.set_exception(e)
        return future

    def measure(self, request: JudgeRequest) -> dict[str, list[tuple[str, float, str]]]:
        """``{question: [(check, value, text), ...]}``: the numbers behind a verdict."""
        plan = self._plan(request)
        renders = self._renders(plan)
        out = _pixels(request.output, "the output image", plan["size"])
        if self.verify_references:
            self._verify(request, renders)
        measure = Measure(out, renders)
        fidelity, consistency = TASK_CHECKS[plan["task"]]
        checks = {"fidelity": fidelity, "consistency": consistency, "realism": REALISM_CHECKS}
        return {q: [(name,) + getattr(measure, name)() for name in names if measure.applies(name)]
                for q, names in checks.items()}

    def _plan(self, request: JudgeRequest) -> dict:
        plan = request.plan
        who = f"sample {request.sample_id}" if request.sample_id else "this sample"
        if not isinstance(plan, dict):
            raise ValueError(f"toy judge: {who} has no plan; the toy judge needs the DualShapes plan from the "
                             "world's manifest.jsonl (JudgeRequest.plan) - use a VLM judge for other data")
        if plan.get("version") != PLAN_VERSION or plan.get("task") not in TASK_CHECKS:
            raise ValueError(f"toy judge: {who} has a plan of version {plan.get('version')!r} for task "
                             f"{plan.get('task')!r}; this judge reads version {PLAN_VERSION} plans of "
                             f"{', '.join(TASK_CHECKS)} - regenerate the world with python -m training.toy.world")
        if request.task and request.task != plan["task"]:
            raise ValueError(f"toy judge: {who} is labelled {request.task!r} but its plan is for {plan['task']!r}")
        return plan

    def _renders(self, plan: dict) -> PlanRenders:
        key = json.dumps(plan, sort_keys=True, separators=(",", ":"))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        try:
            renders = PlanRenders(plan)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"toy judge: the plan cannot be drawn ({type(e).__name__}: {e}); "
                             "regenerate the world with python -m training.toy.world") from None
        with self._lock:
            self._cache[key] = renders
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return renders

    def _verify(self, request: JudgeRequest, renders: PlanRenders) -> None:
        """A plan paired with another sample's references gives meaningless answers: refuse loudly."""
        for k, (image, expected) in enumerate(zip(request.references, renders.refs)):
            if image is None:
                continue
            pixels = _pixels(image, f"reference {k + 1}", expected.shape[:2])
            agree = float((m.distance(pixels[::2, ::2], expected[::2, ::2]) <= 60.0).mean())
            if agree < 0.5:
                raise ValueError(f"toy judge: reference {k + 1} of sample {request.sample_id} does not match its "
                                 f"plan ({agree:.0%} of pixels agree); the request pairs a plan with another "
                                 "sample's images")

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
