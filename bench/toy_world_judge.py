"""Speed of the DualShapes world and of the toy judge, measured side by side in one run.

    python bench/toy_world_judge.py [--n 200]

Prints CPU milliseconds per sample (in memory, and with PNG + manifest writing) and per judge call
(first sight of a plan, which renders it, and again from the plan cache, as DDPO judges each prompt
several times), plus their ratios. CPU time (process_time) keeps the numbers meaningful on a busy
machine; wall time is shown beside it.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from judge.toy import ToyJudge  # noqa: E402
from judge.verdict import JudgeRequest  # noqa: E402

from training.toy.corrupt import corrupt  # noqa: E402
from training.toy.world import ALL_TASKS, generate_world, make_sample  # noqa: E402


def timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.process_time() - cpu, time.perf_counter() - wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="samples per task")
    args = parser.parse_args()
    per_task = args.n
    count = per_task * len(ALL_TASKS)

    samples, cpu, wall = timed(lambda: [make_sample(t, 0, i) for t in ALL_TASKS for i in range(per_task)])
    make_ms = cpu / count * 1000
    print(f"make_sample (in memory):   {make_ms:6.2f} ms/sample CPU ({wall / count * 1000:.2f} wall)")

    with tempfile.TemporaryDirectory() as tmp:
        _, cpu, wall = timed(lambda: generate_world(tmp, seed=0, train=per_task, test=0, progress=False))
    disk_ms = cpu / count * 1000
    print(f"generate_world (PNG+jsonl): {disk_ms:6.2f} ms/sample CPU ({wall / count * 1000:.2f} wall), "
          f"{1000 / disk_ms:.0f} samples/s")

    rng = np.random.default_rng(0)
    outputs = [corrupt("vae_like", s, rng) for s in samples]
    requests = [JudgeRequest.of(s.instruction, s.refs, o, s.id, s.task, s.plan)
                for s, o in zip(samples, outputs)]
    judge = ToyJudge(cache_size=2 * count)
    _, cold_cpu, cold_wall = timed(lambda: [judge.judge(r) for r in requests])
    _, warm_cpu, warm_wall = timed(lambda: [judge.judge(r) for r in requests])
    cold, warm = cold_cpu / count * 1000, warm_cpu / count * 1000
    print(f"toy judge, new plan:       {cold:6.2f} ms/call CPU ({cold_wall / count * 1000:.2f} wall)")
    print(f"toy judge, cached plan:    {warm:6.2f} ms/call CPU ({warm_wall / count * 1000:.2f} wall)")
    print(f"ratios: disk/memory generation {disk_ms / make_ms:.2f}x, judge new/cached {cold / warm:.2f}x, "
          f"judge (new) / generation (memory) {cold / make_ms:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
