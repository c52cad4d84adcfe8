"""Future-style judging for any Judge, so a caller can keep working while verdicts arrive.

    pool = JudgePool(load_judge("gpt-5"))
    futures = [pool.submit(r) for r in requests]   # returns at once
    ...                                            # sample the next batch meanwhile
    for f in futures:
        try: verdict = f.result()
        except Unjudged as e: ...                  # drop or retry the sample; never score it 0

Judges with a native ``submit`` (the HTTP backend, the ensemble) are used as they are; others
(the toy judge) run on ``workers`` threads.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, as_completed  # noqa: F401  (re-exported)
from typing import Iterable, Sequence

from .base import Judge
from .verdict import JudgeRequest, Unjudged, Verdict


def settled(future: Future) -> Future:
    """A future that never fails: it resolves to the result or to the exception object."""
    out: Future = Future()

    def done(f):
        if f.cancelled():
            out.set_result(Unjudged("cancelled before it was judged"))
        elif f.exception() is not None:
            out.set_result(f.exception())
        else:
            out.set_result(f.result())

    future.add_done_callback(done)
    return out


class JudgePool:
    def __init__(self, judge: Judge, workers: int | None = None):
        self.judge = judge
        self._native = callable(getattr(judge, "submit", None))
        self._aborted = False
        self._executor = None
        if not self._native:
            size = workers or getattr(getattr(judge, "profile", None), "concurrency", None) or 2
            self._executor = ThreadPoolExecutor(size, thread_name_prefix=f"judgepool-{judge.name}")

    def submit(self, request: JudgeRequest) -> "Future[Verdict]":
        """Start judging ``request``; the future gives a Verdict or raises Unjudged."""
        if self._native:
            return self.judge.submit(request)
        return self._executor.submit(self.judge.judge, request)

    def map(self, requests: Sequence[JudgeRequest]) -> list[Verdict | Unjudged]:
        """Judge all, concurrently; one result per request, in order, failures as Unjudged values."""
        return collect([self.submit(r) for r in requests])

    def abort(self) -> None:
        """Stop the judge now (Ctrl-C, the Stop button): queued work is cancelled, in-flight requests
        are walked away from; see ``OpenAIJudge.abort``. Judges without it just lose their queue."""
        self._aborted = True
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        abort = getattr(self.judge, "abort", None)
        if callable(abort):
            abort()

    @property
    def usable(self) -> bool:
        """False after ``abort()`` or once the judge stopped (a refused key...): build a new one."""
        return not self._aborted and getattr(self.judge, "usable", True)

    def close(self, close_judge: bool = False) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        if close_judge:
            self.judge.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def collect(futures: Iterable[Future]) -> list:
    """Results in order; Unjudged failures become values, anything else (a bug) is raised."""
    results = []
    for future in futures:
        try:
            results.append(future.result())
        except Unjudged as failure:
            results.append(failure)
    return results
