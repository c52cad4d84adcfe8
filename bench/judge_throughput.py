"""Does the HTTP judge keep its concurrency busy? Throughput against a fixed-latency loopback server.

    python bench/judge_throughput.py [--latency 0.2] [--waves 10] [--concurrency 1 8 32]

A real OpenAIJudge (cache off) judges requests through ``judge_many`` against
judge.loopback.ScriptedChatServer, which answers every call after exactly ``--latency`` seconds.
With c requests in flight the best possible rate is c / latency; the ratio achieved / bound
should be >= 0.9 (the target in issue 6). Each level judges ``waves * c`` requests, i.e.
``3 * waves * c`` HTTP calls (one per question), so every wave of c calls is full.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from judge import JudgeRequest  # noqa: E402
from judge.config import Profile  # noqa: E402
from judge.loopback import Reply, ScriptedChatServer  # noqa: E402
from judge.openai_compat import OpenAIJudge  # noqa: E402


def measure(server, concurrency: int, waves: int, size: int) -> tuple[int, float]:
    profile = Profile(name=f"bench-c{concurrency}", base_url=server.base_url, model="bench", concurrency=concurrency,
                      cache=False, timeout_s=30)
    judge = OpenAIJudge(profile)
    rng = np.random.default_rng(concurrency)
    n_verdicts = waves * concurrency
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n_verdicts + 2)]
    requests = [JudgeRequest("put the object of image 2 into image 1", images[-1], images[-2], images[i])
                for i in range(n_verdicts)]
    judge.judge_many(requests[:1])  # warm-up: threads, connections, image encoding paths
    before = server.count
    start = time.perf_counter()
    results = judge.judge_many(requests)
    wall = time.perf_counter() - start
    judge.close()
    assert all(r.reward == 1.0 for r in results), "the loopback server always answers yes"
    return server.count - before, wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latency", type=float, default=0.2, help="server latency per call, seconds")
    p.add_argument("--waves", type=int, default=6, help="requests per level = waves x concurrency (3 HTTP calls each)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--target", type=float, default=0.9)
    args = p.parse_args(argv)

    print(f"loopback latency {args.latency:.3f} s, {args.size} px images, {args.waves} waves per level")
    print(f"{'concurrency':>11} {'calls':>6} {'wall_s':>7} {'calls/s':>8} {'bound/s':>8} {'ratio':>6}")
    worst = float("inf")
    with ScriptedChatServer(lambda call: Reply.answer("Yes."), latency_s=args.latency, keep_calls=False) as server:
        for c in args.concurrency:
            calls, wall = measure(server, c, args.waves, args.size)
            achieved, bound = calls / wall, c / args.latency
            ratio = achieved / bound
            worst = min(worst, ratio)
            print(f"{c:>11} {calls:>6} {wall:>7.2f} {achieved:>8.1f} {bound:>8.1f} {ratio:>6.3f}")
    verdict = "meets" if worst >= args.target else "MISSES"
    print(f"worst ratio {worst:.3f} {verdict} the target {args.target}")
    return 0 if worst >= args.target else 1


if __name__ == "__main__":
    raise SystemExit(main())
