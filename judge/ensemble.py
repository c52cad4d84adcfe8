"""Several judges on the same request: a verdict per member plus their combination.

The paper reports GPT-5 and SeedVLM side by side; an ensemble profile asks both at once and
keeps each member's verdict in ``EnsembleVerdict.members``. The combined score of a question is
the mean of the members' scores. By default every member must answer (``min_members`` relaxes
that); a member that could not judge is never counted as a "no".
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Sequence

from .accounting import gather
from .base import Judge
from .pool import JudgePool, collect, settled
from .verdict import QUESTIONS, JudgeRequest, JudgeStopped, Unjudged, Verdict


@dataclass
class EnsembleVerdict(Verdict):
    members: dict[str, Verdict] = field(default_factory=dict)  # member name -> its own verdict
    unjudged_members: dict[str, str] = field(default_factory=dict)  # member name -> why it failed

    def to_dict(self) -> dict:
        d = _plain(self).to_dict()
        d["members"] = {name: v.to_dict() for name, v in self.members.items()}
        d["unjudged_members"] = dict(self.unjudged_members)
        return d


def _plain(v: "EnsembleVerdict") -> Verdict:
    names = {f.name for f in dataclasses.fields(Verdict)}
    return Verdict(**{n: getattr(v, n) for n in names})


class EnsembleJudge(Judge):
    def __init__(self, members: dict[str, Judge], min_members: int | None = None, name: str | None = None):
        if not members:
            raise ValueError("an ensemble needs at least one member judge")
        self.members = dict(members)
        self.min_members = len(self.members) if min_members is None else int(min_members)
        if not 1 <= self.min_members <= len(self.members):
            raise ValueError(f"min_members must be within 1..{len(self.members)}, got {min_members}")
        self.name = name or "ensemble(" + ",".join(self.members) + ")"
        modes = {getattr(j, "mode", "binary") for j in self.members.values()}
        self.mode = modes.pop() if len(modes) == 1 else "mixed"
        self._pools = {n: JudgePool(j) for n, j in self.members.items()}

    def submit(self, request: JudgeRequest) -> "Future[Verdict]":
        parts = [settled(pool.submit(request)) for pool in self._pools.values()]
        return gather(parts, lambda results: self._combine(request, results))

    def judge(self, request: JudgeRequest) -> Verdict:
        return self.submit(request).result()

    def judge_many(self, requests: Sequence[JudgeRequest]) -> list[Verdict | Unjudged]:
        return collect([self.submit(r) for r in requests])

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close(close_judge=True)

    def abort(self) -> None:
        for pool in self._pools.values():
            pool.abort()

    @property
    def usable(self) -> bool:
        return all(getattr(j, "usable", True) for j in self.members.values())

    def _combine(self, request: JudgeRequest, results: list) -> EnsembleVerdict:
        verdicts, failures = {}, {}
        for name, result in zip(self.members, results):
            if isinstance(result, Verdict):
                verdicts[name] = result
            elif isinstance(result, Unjudged):
                failures[name] = result.reason
            else:  # a bug in a member: surface it rather than hide it as "unjudged"
                raise result
        if len(verdicts) < self.min_members:
            why = "; ".join(f"{n}: {r}" for n, r in failures.items())
            stopped = [n for n, r in zip(self.members, results) if isinstance(r, JudgeStopped)]
            if len(self.members) - len(stopped) < self.min_members:  # no later request can reach min_members
                raise JudgeStopped(f"ensemble members {', '.join(stopped)} stopped: {why}", request.sample_id)
            raise Unjudged(f"{len(verdicts)}/{len(self.members)} ensemble members answered "
                           f"(need {self.min_members}): {why}", request.sample_id)
        members = list(verdicts.values())
        return EnsembleVerdict(
            **{q: sum(getattr(v, q) for v in members) / len(members) for q in QUESTIONS},
            judge=self.name, mode=self.mode,
            answers={q: " | ".join(f"{n}: {v.answers.get(q, '')}" for n, v in verdicts.items()) for q in QUESTIONS},
            prompt_version=",".join(sorted({v.prompt_version for v in members if v.prompt_version})),
            latency_s=max(v.latency_s for v in members), cache_hit=all(v.cache_hit for v in members),
            sample_id=request.sample_id,
            usage={k: sum(v.usage.get(k, 0) for v in members) for k in ("prompt_tokens", "completion_tokens")},
            cost_usd=sum(v.cost_usd for v in members), members=verdicts, unjudged_members=failures,
        )
