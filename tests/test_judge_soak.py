"""The standing soak (issue 18 item 9): many samples against a loopback server that faults on ~20 %
of HTTP calls with every kind of fault: 429, 500, 503, 408, slow (past the timeout), truncated,
cut off mid-body, dropped, empty, refusal, hedging ("No. Wait, actually yes."), rambling.

Each verdict is checked against the server's scripted truth and against what the server really
said: 0 wrong, 0 made up (no verdict for a question the server never answered plainly), 0
duplicates, and a rerun sends 0 requests. Runs in CI on every push: about 20 s on 2 cores.
"""
import json
import random
import threading
import time
from collections import Counter, defaultdict

import numpy as np
from PIL import Image

from judge import JudgeRequest, Unjudged, Verdict
from judge.cli import main
from judge.config import Profile
from judge.loopback import Reply, ScriptedChatServer
from judge.openai_compat import OpenAIJudge
from judge.verdict import QUESTIONS

N = 1000  # the library soak (judge_many)
N_CLI = 600  # the CLI soak (python -m judge on a manifest)
FAULT_RATE = 0.25  # per call that may fault; with at most two in a row, ~23 % of all calls fault
# Samples whose realism question the server never answers plainly: they must come back Unjudged.
HOPELESS = set(range(7, N, 97))
RAMBLE = ("Looking at the three images in turn, image 1 shows the first reference and image 2 the second; "
          "the lighting differs a little, the framing is tighter, and some details are hard to judge at this "
          "size, so it is a matter of interpretation. ") * 6


def encode(i: int):
    """A 4x4 output image that carries the sample index in its pixels."""
    return np.full((4, 4, 3), (i % 251, i // 251, 99), np.uint8)


def decode(image) -> int:
    r, g, _ = np.asarray(image)[0, 0]
    return int(r) + 251 * int(g)


def truth(i: int, question: str) -> bool:
    return (i * 7 + QUESTIONS.index(question) * 3) % 5 < 3


def word(answer: bool) -> str:
    return "Yes" if answer else "No"


# Each fault, by name: a reply, given the truth of the question asked. The text faults open with
# the WRONG answer, so a parser that read them as verdicts would be caught as wrong.
FAULTS = {
    "429": lambda t: Reply.error(429, "rate limited", {"Retry-After": "0.01"}),
    "500": lambda t: Reply.error(500), "503": lambda t: Reply.error(503), "408": lambda t: Reply.error(408),
    "slow": lambda t: Reply.answer(word(not t), delay_s=0.5),  # slower than the 0.2 s timeout
    "truncated": lambda t: Reply.raw(b'{"choices": [{"message": {"content": "Ye'),
    "cut": lambda t: Reply.short(b'{"choices": [', declared=300),
    "drop": lambda t: Reply.drop(),
    "empty": lambda t: Reply("answer", 200, {"choices": []}),
    "refusal": lambda t: Reply.answer("I'm sorry, but I can't evaluate that."),
    "hedge": lambda t: Reply.answer(f"{word(not t)}. Wait, actually {word(t).lower()}."),
    "both": lambda t: Reply.answer(f"{word(not t)} and {word(t).lower()}."),
    "ramble": lambda t: Reply.answer(f"{word(not t)}... {RAMBLE}Overall, {word(t).lower()}?"),
}


class FaultyTruthServer:
    """Answers the truth for (sample, question); faults on ~FAULT_RATE of calls, at most twice in a
    row per question (so every question can be answered within the retries). Records every plain
    answer it gave, to tell a verdict it gave from one made up."""

    def __init__(self, seed=0, hopeless=frozenset()):
        self.rng = random.Random(seed)
        self.hopeless = hopeless
        self.lock = threading.Lock()
        self.streak = Counter()
        self.faults = Counter()
        self.plain = defaultdict(set)  # (sample, question) -> texts of the plain answers sent
        self.server = ScriptedChatServer(self.script, keep_calls=False)

    def script(self, call):
        i, q = decode(call.images()[2]), call.question
        t = truth(i, q)
        with self.lock:
            fault = self.streak[(i, q)] < 2 and self.rng.random() < FAULT_RATE
            self.streak[(i, q)] = self.streak[(i, q)] + 1 if fault else 0
            kind = self.rng.choice(sorted(FAULTS)) if fault else None
            if i in self.hopeless and q == "realism":
                kind = self.rng.choice(["refusal", "hedge", "both", "ramble"])
            if kind:
                self.faults[kind] += 1
                self.faults["total"] += 1
            else:
                text = f"{word(t)}, it does." if t else "No."
                self.plain[(i, q)].add(text)
        return FAULTS[kind](t) if kind else Reply.answer(text, usage=(120, 4))


def check_verdict(verdict: dict | Verdict, i: int, plain):
    """0 wrong (the truth) and 0 made up (every answer is one the server gave for that question)."""
    scores = verdict.scores() if isinstance(verdict, Verdict) else {q: verdict[q] for q in QUESTIONS}
    answers = verdict.answers if isinstance(verdict, Verdict) else verdict["answers"]
    assert scores == {q: float(truth(i, q)) for q in QUESTIONS}, f"sample {i}: wrong verdict {answers}"
    for q in QUESTIONS:
        assert answers[q] in plain[(i, q)], f"sample {i} {q}: {answers[q]!r} is not an answer the server gave"


def assert_mixed_faults(faulty, calls):
    share = faulty.faults["total"] / calls
    assert 0.2 <= share < 0.32, share  # at least 20 % of all HTTP calls faulted
    missing = set(FAULTS) - set(faulty.faults)
    assert not missing, f"fault kinds never injected: {missing}"
    return share


def judge_for(server, cache_dir):
    return OpenAIJudge(Profile(
        name="soak", base_url=server.base_url, model="soak-vlm", concurrency=16, timeout_s=0.2,
        backoff_base_s=0.002, backoff_max_s=0.02, max_retries=6, parse_retries=2, cache_dir=str(cache_dir),
    ))


def test_soak_1000_requests_with_20_percent_faults(tmp_path):
    faulty = FaultyTruthServer(hopeless=HOPELESS)
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
        assert [r.sample_id for r in results] == [str(i) for i in range(N)]  # one result per sample, no duplicate
        for i, result in enumerate(results):
            if i in HOPELESS:
                assert isinstance(result, Unjudged), f"sample {i} got a verdict the server never gave"
                assert result.sample_id == str(i) and "realism" in result.reason
                continue
            assert isinstance(result, Verdict), f"sample {i}: {result}"
            check_verdict(result, i, faulty.plain)
        share = assert_mixed_faults(faulty, calls_first_run)
        assert stats["verdicts"] == N - len(HOPELESS) and stats["unjudged"] == len(HOPELESS)
        assert stats["retries"] > 0.1 * calls_first_run
        print(f"\nsoak: {N} requests, {calls_first_run} HTTP calls, {share:.1%} faulted, {elapsed:.1f}s")

        # Rerun: every answered question comes from the cache; only the hopeless ones go out again.
        faulty.server.keep_calls = True
        judge = judge_for(faulty.server, tmp_path)
        try:
            again = judge.judge_many(requests)
        finally:
            judge.close()
        asked = Counter((decode(call.images()[2]), call.question) for call in faulty.server.calls)
        assert set(asked) == {(i, "realism") for i in HOPELESS}  # nothing answered is asked twice
        assert all(n >= 3 for n in asked.values())  # asked, then re-asked twice (more only after a timeout)
        for i, result in enumerate(again):
            if i in HOPELESS:
                assert isinstance(result, Unjudged)
            else:
                assert result.cache_hit and result.scores() == results[i].scores()


def test_soak_cli_600_samples_with_20_percent_faults_and_a_rerun_sends_nothing(tmp_path):
    """``python -m judge`` end to end: every sample judged exactly once and right, the summary
    counts add up, and reruns (same results folder, or a fresh one on the same cache) send 0 requests."""
    data = tmp_path / "data"
    (data / "out").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(data / "r1.png")
    Image.fromarray(np.full((4, 4, 3), 255, np.uint8)).save(data / "r2.png")
    tasks = ["animal_scene", "person_scene", "group_portrait", "style_transfer", "clothing_replace"]
    with open(data / "manifest.jsonl", "w") as fh:
        for i in range(N_CLI):
            fh.write(json.dumps({"id": f"c{i}", "task": tasks[i % 5], "images": ["r1.png", "r2.png"],
                                 "instruction": f"edit {i}", "split": "test"}) + "\n")
            Image.fromarray(encode(i)).save(data / "out" / f"c{i}.png")
    faulty = FaultyTruthServer(seed=1)
    with faulty.server:
        config = tmp_path / "judges.json"
        config.write_text(json.dumps({"profiles": {"soak": {
            "base_url": faulty.server.base_url, "model": "soak-vlm", "concurrency": 16, "timeout_s": 0.2,
            "backoff_base_s": 0.002, "backoff_max_s": 0.02, "max_retries": 6, "parse_retries": 2,
            "cache_dir": str(tmp_path / "cache")}}}))

        def run(out):
            return main(["--profile", "soak", "--config", str(config), "--manifest", str(data / "manifest.jsonl"),
                         "--outputs", str(data / "out"), "--out", str(tmp_path / out)])

        start = time.monotonic()
        assert run("res") == 0
        elapsed = time.monotonic() - start
        calls = faulty.server.count
        lines = [json.loads(x) for x in (tmp_path / "res" / "verdicts.jsonl").read_text().splitlines()]
        ids = Counter(r["id"] for r in lines)
        assert len(ids) == N_CLI and max(ids.values()) == 1  # 0 duplicates, none lost
        for record in lines:
            assert record["status"] == "judged", record
            check_verdict(record["verdict"], int(record["id"][1:]), faulty.plain)
        summary = json.loads((tmp_path / "res" / "summary.json").read_text())
        assert summary["n_samples"] == N_CLI and summary["overall"]["n_judged"] == N_CLI
        assert summary["usage_this_run"]["verdicts"] == N_CLI
        share = assert_mixed_faults(faulty, calls)
        print(f"\nCLI soak: {N_CLI} samples, {calls} HTTP calls, {share:.1%} faulted, {elapsed:.1f}s")

        assert run("res") == 0  # the same results folder: everything is judged already
        assert run("res_again") == 0  # a fresh one: every answer comes from the cache
        assert faulty.server.count == calls, f"a rerun sent {faulty.server.count - calls} requests"
        again = {r["id"]: r for r in map(json.loads, (tmp_path / "res_again" / "verdicts.jsonl").read_text().splitlines())}
        assert len(again) == N_CLI and all(r["verdict"]["cache_hit"] for r in again.values())
        assert all(again[r["id"]]["verdict"]["reward"] == r["verdict"]["reward"] for r in lines)
