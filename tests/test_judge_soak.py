"""1,000 judge requests against a loopback server that faults on ~20 % of HTTP calls.

Every verdict is checked against the server's scripted truth: no crash, no request without a
result, no verdict for a sample the server never answered, and all answers from cache on rerun.
"""
import random
import threading
import time
from collections import Counter

import numpy as np

from judge import JudgeRequest, Unjudged, Verdict
from judge.config import Profile
from judge.loopback import Reply, ScriptedChatServer
from judge.openai_compat import OpenAIJudge
from judge.verdict import QUESTIONS

N = 1000
FAULT_RATE = 0.2
# Samples whose realism question the server never answers properly: they must come back Unjudged.
HOPELESS = set(range(7, N, 97))


def encode(i: int):
    """A 4x4 output image that carries the sample index in its pixels."""
    return np.full((4, 4, 3), (i % 251, i // 251, 99), np.uint8)


def decode(image) -> int:
    r, g, _ = np.asarray(image)[0, 0]
    return int(r) + 251 * int(g)


def truth(i: int, question: str) -> bool:
    return (i * 7 + QUESTIONS.index(question) * 3) % 5 < 3


FAULTS = [
    lambda: Reply.error(429, "rate limited", {"Retry-After": "0.01"}),
    lambda: Reply.error(500), lambda: Reply.error(503), lambda: Reply.error(408),
    lambda: Reply.answer("Yes", delay_s=0.5),  # slower than the 0.2 s timeout
    lambda: Reply.raw(b'{"choices": [{"message": {"content": "Ye'),
    lambda: Reply.short(b'{"choices": [', declared=300),
    lambda: Reply.drop(),
    lambda: Reply("answer", 200, {"choices": []}),
    lambda: Reply.answer("I'm sorry, but I can't evaluate that."),
]


class FaultyTruthServer:
    """Answers the truth for (sample, question); faults on ~FAULT_RATE of calls, at most twice in a row."""

    def __init__(self, seed=0):
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.streak = Counter()
        self.faults = Counter()
        self.server = ScriptedChatServer(self.script, keep_calls=False)

    def script(self, call):
        i, q = decode(call.images()[2]), call.question
        with self.lock:
            fault = self.streak[(i, q)] < 2 and self.rng.random() < FAULT_RATE
            self.streak[(i, q)] = self.streak[(i, q)] + 1 if fault else 0
            if fault or (i in HOPELESS and q == "realism"):
                self.faults["total"] += 1
        if i in HOPELESS and q == "realism":
            return Reply.answer("As an AI, I cannot judge realism.")
        if fault:
            return self.rng.choice(FAULTS)()
        return Reply.answer("Yes, it does." if truth(i, q) else "No.", usage=(120, 4))


def judge_for(server, cache_dir):
    return OpenAIJudge(Profile(
        name="soak", base_url=server.base_url, model="soak-vlm", concurrency=16, timeout_s=0.2,
        backoff_base_s=0.002, backoff_max_s=0.02, max_retries=6, parse_retries=2, cache_dir=str(cache_dir),
    ))


def test_soak_1000_requests_with_20_percent_faults(tmp_path):
    faulty = FaultyTruthServer()
    reference1, reference2 = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)
    requests = [JudgeRequest(f"edit {i}", reference1, reference2, encode(i), sample_id=str(i)) for i in range(N)]
    with faulty.server:
        judge = judge_for(faulty.server, tmp_path)
        start = time.monotonic()
        try:
            results = judge.judge_many(requests)
        finally:
            judge.close()
        elapsed = time.monotonic() - start
        calls_first_run = faulty.server.count
        stats = judge.accounting.snapshot()

        assert len(results) == N and not faulty.server.errors
        for i, result in enumerate(results):
            if i in HOPELESS:
                assert isinstance(result, Unjudged), f"sample {i} got a verdict the server never gave"
                assert result.sample_id == str(i) and "realism" in result.reason
                continue
            assert isinstance(result, Verdict), f"sample {i}: {result}"
            assert result.sample_id == str(i)
            assert result.scores() == {q: float(truth(i, q)) for q in QUESTIONS}, f"sample {i}"
        fault_share = faulty.faults["total"] / calls_first_run
        assert 0.15 < fault_share < 0.25, fault_share
        assert stats["verdicts"] == N - len(HOPELESS) and stats["unjudged"] == len(HOPELESS)
        assert stats["retries"] > 0.15 * calls_first_run
        print(f"\nsoak: {N} requests, {calls_first_run} HTTP calls, {fault_share:.1%} faulted, {elapsed:.1f}s")

        # Rerun: every answered question comes from the cache; only the hopeless ones go out again.
        faulty.server.keep_calls = True
        judge = judge_for(faulty.server, tmp_path)
        try:
            again = judge.judge_many(requests)
        finally:
            judge.close()
        asked = Counter((decode(call.images()[2]), call.question) for call in faulty.server.calls)
        assert set(asked) == {(i, "realism") for i in HOPELESS}
        assert all(n >= 3 for n in asked.values())  # asked, then re-asked twice (more only after a timeout)
        for i, result in enumerate(again):
            if i in HOPELESS:
                assert isinstance(result, Unjudged)
            else:
                assert result.cache_hit and result.scores() == results[i].scores()
