"""Token, request and cost counters for one judge, safe to update from many threads."""
from __future__ import annotations

import threading
from concurrent.futures import CancelledError, Future

from .verdict import Unjudged

COUNTERS = ("requests", "retries", "prompt_tokens", "completion_tokens", "cache_hits", "verdicts", "unjudged")


class Accounting:
    def __init__(self, price_input_per_mtok: float = 0.0, price_output_per_mtok: float = 0.0):
        self.price_in = float(price_input_per_mtok)
        self.price_out = float(price_output_per_mtok)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(COUNTERS, 0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price_in + completion_tokens * self.price_out) / 1e6

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                self._counts[name] += int(value)

    def count_attempt(self, kind: str) -> None:
        self.add(**{"requests" if kind == "request" else "retries": 1})

    def snapshot(self) -> dict:
        with self._lock:
            counts = dict(self._counts)
        counts["cost_usd"] = self.cost(counts["prompt_tokens"], counts["completion_tokens"])
        return counts


def usage_of(body: dict) -> tuple[int, int]:
    """(prompt, completion) tokens from an OpenAI-style ``usage`` block; zeros when absent."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0, 0

    def number(name):
        value = usage.get(name)
        return int(value) if isinstance(value, (int, float)) and value >= 0 else 0

    return number("prompt_tokens"), number("completion_tokens")


def gather(futures: list[Future], combine) -> Future:
    """A future for ``combine([results...])`` once all ``futures`` finish; no thread blocks on it.

    The first failure (in order) becomes the result's exception; cancelling the result cancels
    the parts that have not started.
    """
    out: Future = Future()  # left PENDING (not RUNNING) so that out.cancel() works
    remaining = [len(futures)]
    lock = threading.Lock()

    def finish():
        try:
            value = combine([f.result() for f in futures])
        except CancelledError:
            value = Unjudged("cancelled before it was judged (the judge was closed or the run interrupted)")
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            value = e
        if out.done():
            return
        try:
            if isinstance(value, BaseException):
                out.set_exception(value)
            else:
                out.set_result(value)
        except Exception:  # InvalidStateError: cancelled meanwhile
            pass

    def on_part_done(_):
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            finish()

    def on_out_done(f):
        if f.cancelled():
            for part in futures:
                part.cancel()

    if not futures:
        finish()
        return out
    for part in futures:
        part.add_done_callback(on_part_done)
    out.add_done_callback(on_out_done)
    return out
