"""``python -m training.toy.three_refs``: is the three-reference toy task learned by SFT beyond its base?

    python -m training.toy.three_refs --markdown docs/toy_three_refs.md

Steps: (1) a world of the opt-in three-reference task only (``two_figures_scene``: the figures of
images 2 and 3 into image 1's scene; 256 train / 64 test, world seed 0) under ``<out>/world``;
(2) the toy base (training/toy/base.py, the default recipe unless ``--recipe``); (3) for each seed:
the base judged on the test split with sampling seed ``seed``, one SFT LoRA trained with
``train.seed = seed`` (training/configs/toy_sft.json on that task, ``--steps`` steps) and judged
from the same noise, so base and SFT are paired sample by sample. Prints base vs SFT per seed and
the paired gain (mean ± standard error over the test samples) per seed and pooled over seeds.
Every run and evaluation is cached like ``python -m training.toy``'s.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from judge.manifest import MULTI_TASKS

from .__main__ import DEFAULT_SFT_CONFIG, parse_recipe, sft_run
from .tables import evaluate, paired_gains
from .world import generate_world

TASK = MULTI_TASKS[0]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training.toy.three_refs", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--out", type=Path, default=Path("runs/toy/three_refs"), help="default: %(default)s")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="SFT and sampling seeds (default 0 1 2)")
    p.add_argument("--steps", type=int, default=400, help="SFT steps per seed (default 400)")
    p.add_argument("--train", type=int, default=256, help="training samples (default 256)")
    p.add_argument("--test", type=int, default=64, help="test samples (default 64)")
    p.add_argument("--layout", default="diagonal", choices=("offset", "index", "diagonal", "uxo"))
    p.add_argument("--cache-dir", help="toy base cache (default: $DUALREF_CACHE or ~/.cache/dualref)")
    p.add_argument("--recipe", action="append", default=[], metavar="KEY=VALUE", help="toy base recipe override")
    p.add_argument("--sft-config", type=Path, default=DEFAULT_SFT_CONFIG, help="SFT config (default: %(default)s)")
    p.add_argument("--sft-set", action="append", default=[], metavar="KEY=VALUE", help="SFT config override")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def gain_cell(gain) -> str:
    mean, se, n = gain
    return f"{mean:+.3f} ± {se:.3f} (n {n})"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..models import load_kontext
    from .base import toy_base

    started, progress = time.perf_counter(), not args.quiet
    try:
        generate_world(args.out / "world", 0, args.train, args.test, tasks=(TASK,), progress=progress)
        base = toy_base(args.cache_dir, progress=progress, **parse_recipe(args.recipe))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest, evals = args.out / "world" / "manifest.jsonl", args.out / "evals"
    bundle = functools.lru_cache(maxsize=1)(lambda: load_kontext(base))
    common = dict(layout=args.layout, tasks=[TASK], bundle=bundle, progress=progress, with_samples=True)
    args.sft_set = [f"data.tasks=[\"{TASK}\"]", f"train.max_steps={args.steps}",
                    "run.val_every=0", "run.val_samples=0"] + list(args.sft_set)
    lines = ["| Seed | Base | SFT | SFT - base (paired) | SFT s |", "|---:|---:|---:|---:|---:|"]
    diffs = []
    for seed in args.seeds:
        base_summary, base_samples = evaluate(base, manifest, evals, seed=seed, **common)
        run_args = argparse.Namespace(**{**vars(args), "sft_set": args.sft_set + [f"train.seed={seed}"]})
        lora, seconds = sft_run(base, manifest, args.out / f"sft-seed{seed}", args.layout, run_args)
        sft_summary, sft_samples = evaluate(base, manifest, evals, seed=seed, lora=lora, **common)
        gain = paired_gains(base_samples, sft_samples, tasks=(TASK,))[TASK]
        by_id = {s["id"]: s["reward"] for s in base_samples}
        diffs += [s["reward"] - by_id[s["id"]] for s in sft_samples if s["id"] in by_id]
        lines.append(f"| {seed} | {base_summary[TASK]['reward']:.3f} | {sft_summary[TASK]['reward']:.3f} | "
                     f"{gain_cell(gain)} | {seconds:.0f} |")
        for name, summary in (("base", base_summary), ("SFT", sft_summary)):
            block = summary[TASK]
            print(f"seed {seed} {name}: fidelity {block['fidelity']:.3f} consistency {block['consistency']:.3f} "
                  f"realism {block['realism']:.3f} reward {block['reward']:.3f}")
    d = np.array(diffs)
    pooled = (float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size)), int(d.size))
    lines.append(f"| all | | | {gain_cell(pooled)} | |")
    text = "\n".join(lines)
    print(text)
    print(f"(total {time.perf_counter() - started:.0f} s this run)")
    if args.markdown:
        command = "python -m training.toy.three_refs " + " ".join(argv if argv is not None else sys.argv[1:])
        header = [f"Command: `{command.strip()}` (base {base.name}, layout {args.layout}, {args.steps} SFT steps, "
                  f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')})", ""]
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(header + [text]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
