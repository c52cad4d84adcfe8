"""The one judge interface that training, the benchmark and the ComfyUI node call."""
from __future__ import annotations

import abc
from typing import Sequence

from .verdict import JudgeRequest, Unjudged, Verdict


class Judge(abc.ABC):
    """Answers the three questions for one request. Backends subclass this.

    ``judge`` returns a :class:`Verdict` or raises :class:`Unjudged`; it never invents a score.
    """

    name: str = "judge"
    mode: str = "binary"

    @abc.abstractmethod
    def judge(self, request: JudgeRequest) -> Verdict:
        ...

    def judge_many(self, requests: Sequence[JudgeRequest]) -> list[Verdict | Unjudged]:
        """One result per request, in order; failures come back as ``Unjudged`` values."""
        results: list[Verdict | Unjudged] = []
        for request in requests:
            try:
                results.append(self.judge(request))
            except Unjudged as failure:
                results.append(failure)
        return results

    def close(self) -> None:
        """Release connections/threads; safe to call twice."""
