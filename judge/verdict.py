"""The judge's answer for one edited image (DESIGN contract 6), and the request it answers.

Kept free of heavy imports: training, the benchmark and the ComfyUI node all share it.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

QUESTIONS = ("fidelity", "consistency", "realism")
MODES = ("binary", "probability")


class Unjudged(Exception):
    """A judgement that could not be made (server down, unparseable after retries, ...).

    Never turn this into a score: callers drop or retry the sample, they do not reward 0.
    """

    def __init__(self, reason: str, sample_id: str | None = None):
        super().__init__(reason if sample_id is None else f"{sample_id}: {reason}")
        self.reason = reason
        self.sample_id = sample_id

    def for_sample(self, sample_id: str | None) -> "Unjudged":
        """The same failure (same class) naming ``sample_id``."""
        other = copy.copy(self)
        other.sample_id = sample_id
        other.args = (self.reason if sample_id is None else f"{sample_id}: {self.reason}",)
        return other


class JudgeStopped(Unjudged):
    """The server refused the profile itself: a rejected key (401/403), no credit (402), an unknown
    model or endpoint (404), a redirect to another host. No request with this profile can succeed,
    so the judge sends no more of them; callers stop (the CLI exits 2 with ``reason``)."""


@dataclass
class JudgeRequest:
    """What a judge looks at: the instruction, the references and the output, in that order."""

    instruction: str
    reference1: Any  # PIL.Image.Image or HxWx3 uint8 array
    reference2: Any | None
    output: Any
    sample_id: str | None = None
    task: str | None = None
    plan: dict | None = None  # the structured edit plan, when the data has one (toy judge uses it)
    more_references: list = field(default_factory=list)  # references 3, 4, ... (three-reference tasks)

    @classmethod
    def of(cls, instruction: str, references, output, sample_id=None, task=None, plan=None) -> "JudgeRequest":
        """A request from a list of one or more references (reference 1 first)."""
        refs = list(references)
        return cls(instruction, refs[0], refs[1] if len(refs) > 1 else None, output, sample_id, task, plan,
                   refs[2:])

    @property
    def references(self) -> list:
        """Every reference, in order (reference 1 first; a single-reference request has one)."""
        return [self.reference1] + ([self.reference2] if self.reference2 is not None else []) + \
            list(self.more_references)


@dataclass
class Verdict:
    fidelity: float
    consistency: float
    realism: float
    judge: str  # backend/model that answered, e.g. "toy" or "gpt-5@openai"
    mode: str = "binary"
    answers: dict[str, str] = field(default_factory=dict)  # raw answer text per question
    prompt_version: str = ""
    latency_s: float = 0.0
    cache_hit: bool = False
    sample_id: str | None = None
    usage: dict[str, int] = field(default_factory=dict)  # prompt/completion tokens spent (none on cache hits)
    cost_usd: float = 0.0  # from the profile's prices
    notes: dict[str, str] = field(default_factory=dict)  # per question, e.g. a configured fallback that was used

    def __post_init__(self):
        for q in QUESTIONS:
            v = float(getattr(self, q))
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{q} must be in [0, 1], got {v}")
            setattr(self, q, v)

    @property
    def reward(self) -> float:
        return (self.fidelity + self.consistency + self.realism) / 3.0

    def scores(self) -> dict[str, float]:
        return {q: getattr(self, q) for q in QUESTIONS}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["reward"] = self.reward
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Verdict":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
