"""Calibrate the toy judge: pass rates per task, corruption and question, over generated samples.

    python -m training.toy.calibrate --n 30 [--seed 0 --aspect-mix --size 64 --mode binary]

For each sample, the exact target and each output of ``training.toy.corrupt`` are judged; the
table gives, per corruption and task, the share of samples answered "yes" (or the mean score in
probability mode) for fidelity / consistency / realism. tests/test_toy_judge.py states which of
these must be 0 and which must stay 1.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np

from judge.toy import ToyJudge
from judge.verdict import QUESTIONS, JudgeRequest

from .corrupt import KINDS, corrupt
from .world import ALL_TASKS, make_sample

ROWS = ("exact",) + KINDS


def calibrate(n: int = 20, seed: int = 0, aspect_mix: bool = False, judge=None, tasks=ALL_TASKS,
              kinds=ROWS, split: str = "test", size: int = 64) -> dict:
    """``{(kind, task): {"fidelity": rate, "consistency": rate, "realism": rate, "n": count}}``
    plus ``"_seconds_per_call"``: the judge's mean wall time per call."""
    judge = judge or ToyJudge()
    sums = defaultdict(lambda: np.zeros(len(QUESTIONS) + 1))
    seconds, calls = 0.0, 0
    for task in tasks:
        for index in range(n):
            sample = make_sample(task, seed, index, split, size=size, aspect_mix=aspect_mix)
            rng = np.random.default_rng([seed, index, 7])
            for kind in kinds:
                output = sample.target if kind == "exact" else corrupt(kind, sample, rng)
                if output is None:
                    continue
                request = JudgeRequest.of(sample.instruction, sample.refs, output, sample.id, task, sample.plan)
                start = time.perf_counter()
                verdict = judge.judge(request)
                seconds += time.perf_counter() - start
                calls += 1
                sums[(kind, task)] += [getattr(verdict, q) for q in QUESTIONS] + [1]
    table = {key: dict(zip(QUESTIONS, (v[:-1] / v[-1]).tolist()), n=int(v[-1])) for key, v in sums.items()}
    table["_seconds_per_call"] = seconds / max(calls, 1)
    return table


def format_table(table: dict, tasks=ALL_TASKS, kinds=ROWS) -> str:
    """One row per corruption, one column per task: ``fidelity/consistency/realism`` pass rates."""
    short = {t: t.split("_")[0][:7] for t in tasks}
    lines = ["corruption    " + "".join(f"{short[t]:>16s}" for t in tasks),
             " " * 14 + "".join(f"{'fid/con/rea':>16s}" for _ in tasks)]
    for kind in kinds:
        cells = []
        for task in tasks:
            row = table.get((kind, task))
            cells.append("               -" if row is None else
                         "  " + "/".join(f"{row[q]:.2f}" for q in QUESTIONS).rjust(14))
        lines.append(f"{kind:14s}" + "".join(cells))
    if "_seconds_per_call" in table:
        lines.append(f"judge: {table['_seconds_per_call'] * 1000:.2f} ms per call (wall, cached renders included)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.toy.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20, help="samples per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aspect-mix", action="store_true", help="references also 4:3 landscape/portrait")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--mode", default="binary", choices=("binary", "probability"))
    args = parser.parse_args(argv)
    table = calibrate(args.n, args.seed, args.aspect_mix, ToyJudge(mode=args.mode), size=args.size)
    print(format_table(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
