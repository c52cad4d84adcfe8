"""The README's main job from a clean start, stage by stage, against its 10-minute target (issue 21).

    python bench/main_job.py              # a fresh `python -m training.ddpo` (empty cache, new run folder)
    python bench/main_job.py --before     # ... and, side by side in the same run, the stages as they were
                                          #     before the toy base shipped (~35 minutes on 2 cores)
    python bench/main_job.py --keep DIR   # keep the run folders (tables, grid.png) in DIR

The fresh run is the README's command exactly (default threads, the toy config), in a temporary run
folder with an empty ``$DUALREF_CACHE``; its stage times come from the run's own ``stages.json``. With
``--before`` the script also times, one after the other on the same machine: building the toy base
from its recipe (``python -m training.toy.base --force``, what every fresh main job did before the
base shipped) and the main job with the earlier SFT length (1600 steps) and evaluation batch (16).
It prints each stage's seconds and the ratios after / before and total / 600 s.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 600.0
STAGES = ("world", "base", "sft", "ddpo", "eval")


def main_job(out: Path, cache: Path, extra=()) -> dict:
    """Run the main job as the README gives it; ``{stage: seconds, "wall": seconds}``."""
    env = dict(os.environ, DUALREF_CACHE=str(cache))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "training.ddpo", "--out", str(out), "-q", *extra], cwd=REPO, env=env,
                   check=True)
    wall = time.perf_counter() - start
    stages = json.loads((out / "stages.json").read_text())
    times = {name: stages[name]["seconds"] for name in STAGES if name in stages}
    times["wall"] = wall
    times["summary"] = json.loads((out / "summary.json").read_text())
    return times


def base_build(cache: Path) -> float:
    env = dict(os.environ, DUALREF_CACHE=str(cache))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "training.toy.base", "--force"], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", action="store_true",
                        help="also time the stages as they were before (base built, SFT 1600 steps, eval batch 16)")
    parser.add_argument("--keep", metavar="DIR", help="keep the run folders (and their caches) in DIR, which must "
                                                      "not exist yet (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    if args.keep and Path(args.keep).exists():
        parser.error(f"--keep {args.keep} exists: name a new folder, so the caches start empty")
    with (contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory()) as tmp:
        tmp = Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        after = main_job(tmp / "after", tmp / "cache-after")
        before = None
        if args.before:
            sft = json.loads((REPO / "training/configs/toy_sft.json").read_text())
            sft["train"]["max_steps"] = 1600
            (tmp / "toy_sft_1600.json").write_text(json.dumps(sft))
            built = base_build(tmp / "cache-before")
            before = main_job(tmp / "before", tmp / "cache-before",
                              ["--set", f"sft_config={tmp / 'toy_sft_1600.json'}", "--set", "eval.batch_size=16"])
            before["base"], before["wall"] = built, before["wall"] + built
    print(f"{'stage':<8} {'after s':>9}" + (f" {'before s':>9} {'after/before':>13}" if before else ""))
    for name in STAGES + ("wall",):
        line = f"{name:<8} {after.get(name, 0.0):>9.1f}"
        if before:
            ratio = after.get(name, 0.0) / before[name] if before.get(name) else float("nan")
            line += f" {before.get(name, 0.0):>9.1f} {ratio:>13.3f}"
        print(line)
    print(f"fresh main job: {after['wall']:.0f} s = {after['wall'] / TARGET_S:.2f} x the 10-minute target "
          f"(threads: {os.environ.get('OMP_NUM_THREADS', 'default')})")
    print("Table 2 means: " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in after["summary"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
