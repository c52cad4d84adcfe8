"""The GEdit-Bench / VIEScore-style 0-10 result, for the single-reference regression (paper Table 1).

SC (semantic consistency) = min(instruction success, minimal over-editing),
PQ (perceptual quality)   = min(naturalness, freedom from artifacts),
overall                   = sqrt(SC * PQ), all on 0-10.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

SCORE_MODE = "score"
SCORE_ASPECTS = ("semantic_consistency", "perceptual_quality")


@dataclass
class EditScore:
    semantic_consistency: float
    perceptual_quality: float
    judge: str
    sub_scores: dict[str, list[float]] = field(default_factory=dict)  # the two raw numbers per aspect
    answers: dict[str, str] = field(default_factory=dict)
    prompt_version: str = ""
    latency_s: float = 0.0
    cache_hit: bool = False
    sample_id: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    cost_usd: float = 0.0
    mode: str = SCORE_MODE

    def __post_init__(self):
        for name in SCORE_ASPECTS:
            value = float(getattr(self, name))
            if not 0.0 <= value <= 10.0:
                raise ValueError(f"{name} must be in [0, 10], got {value}")
            setattr(self, name, value)

    @property
    def overall(self) -> float:
        return math.sqrt(self.semantic_consistency * self.perceptual_quality)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["overall"] = self.overall
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EditScore":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
