"""Generate the DualShapes world: PNGs, ``manifest.jsonl`` (DESIGN contract 5) and ``world.json``.

    python -m training.toy.world --out runs/toy/world --seed 0 --train 256 --test 64

``--train``/``--test`` are per task (the five dual tasks); ``single_edit`` gets ``--single-train`` /
``--single-test`` (default: the same). The three-reference task ``two_figures_scene`` is opt-in
(``--tasks two_figures_scene``): never in the default list, and its samples draw from streams of
their own, so no existing task's samples change. Each sample is drawn from its own seeded stream
(seed, task, split, index), so a world is identical for the same arguments and a sample can be
re-made in memory with :func:`make_sample` without reading any file.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from judge.manifest import MULTI_TASKS, REFERENCE_COUNTS, SINGLE_TASKS, TASKS, Sample, write_manifest
from judge.toy.scene import render

from ..files import write_json
from .single import single_edit
from .tasks import BUILDERS, PLAN_VERSION, NoChoice
from .templates import vocabulary

log = logging.getLogger(__name__)

WORLD_NAME = "DualShapes"
# 2: block rendering (scene.CELL); 3: group portrait and style transfer edit image 1;
# 4: geometry on the token grid (scene.TOKEN), one shape size, image 2's object centred;
# 5: person_scene also asks for a medium figure (image 2's own size)
WORLD_VERSION = 5
ALL_TASKS = TASKS + SINGLE_TASKS  # the default world (the toy base's VAE and the main job use these)
# Every task the world can draw; opt-in ones come after ALL_TASKS, so each task's seed stream
# (its index here) stays what it was.
TOY_TASKS = ALL_TASKS + MULTI_TASKS
_BUILDERS = {**BUILDERS, "single_edit": single_edit}
_SPLIT_CODE = {"train": 0, "test": 1}


@dataclass
class ToySample:
    """One sample in memory: reference pixels (HxWx3 uint8), the exact target, its plan."""

    id: str
    task: str
    split: str
    instruction: str
    refs: list[np.ndarray]
    target: np.ndarray
    plan: dict


def reference_sizes(rng, size: int, aspect_mix: bool, count: int) -> list[tuple[int, int]]:
    """``(H, W)`` of each reference: square, or with ``aspect_mix`` also landscape / portrait 4:3."""
    if not aspect_mix:
        return [(size, size)] * count
    short = round(size * 0.75)
    options = [(size, size), (short, size), (size, short)]
    return [options[int(rng.integers(3))] for _ in range(count)]


def make_sample(task: str, seed: int, index: int, split: str = "train", size: int = 64,
                aspect_mix: bool = False) -> ToySample:
    """The sample ``index`` of ``task`` in ``split`` for ``seed`` (deterministic)."""
    if task not in _BUILDERS:
        raise ValueError(f"unknown toy task {task!r}; use one of {', '.join(TOY_TASKS)}")
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    if size < 32:
        raise ValueError(f"toy images must be at least 32 px (got {size}); shapes and textures need the room")
    rng = np.random.default_rng([int(seed), TOY_TASKS.index(task), _SPLIT_CODE[split], int(index)])
    count = REFERENCE_COUNTS[task][0]  # the world draws the fewest a task takes: 1, 2, or 3
    sizes = reference_sizes(rng, size, aspect_mix, count)
    for _ in range(100):
        try:
            case = _BUILDERS[task](rng, *sizes)
            break
        except NoChoice:  # a draw whose colours cannot all be told apart: draw again
            continue
    else:  # pragma: no cover - the palette always admits a choice within a few draws
        raise RuntimeError(f"could not draw a {task} sample for seed {seed}, index {index}")
    return ToySample(id=f"{task}-{split}-{index:05d}", task=task, split=split, instruction=case.instruction,
                     refs=[render(s) for s in case.refs], target=render(case.target), plan=case.plan)


def _config(seed, train, test, single_train, single_test, size, aspect_mix, tasks) -> dict:
    counts = {t: {"train": single_train if t in SINGLE_TASKS else train,
                  "test": single_test if t in SINGLE_TASKS else test} for t in tasks}
    return {"name": WORLD_NAME, "version": WORLD_VERSION, "plan_version": PLAN_VERSION, "seed": int(seed),
            "size": int(size), "aspect_mix": bool(aspect_mix), "counts": counts}


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array, "RGB").save(path, format="PNG", compress_level=1)


def generate_world(out_dir, seed: int = 0, train: int = 256, test: int = 64, *, single_train: int | None = None,
                   single_test: int | None = None, size: int = 64, aspect_mix: bool = False,
                   tasks=ALL_TASKS, force: bool = False, progress: bool = True) -> dict:
    """Write the world under ``out_dir`` and return its description (``world.json``).

    A folder that already holds this exact world (same ``world.json`` settings and a manifest) is
    left as it is, so reruns cost nothing; ``force`` regenerates it.
    """
    out = Path(out_dir)
    unknown = [t for t in tasks if t not in TOY_TASKS]
    if unknown:
        raise ValueError(f"unknown toy task(s) {', '.join(unknown)}; use {', '.join(TOY_TASKS)}")
    if min(train, test) < 0:
        raise ValueError("--train and --test must be >= 0")
    single_train = train if single_train is None else single_train
    single_test = test if single_test is None else single_test
    config = _config(seed, train, test, single_train, single_test, size, aspect_mix, tuple(tasks))
    info_path, manifest_path = out / "world.json", out / "manifest.jsonl"
    if not force and info_path.exists() and manifest_path.exists():
        try:
            existing = json.loads(info_path.read_text())
        except (OSError, json.JSONDecodeError):
            existing = {}
        if {k: existing.get(k) for k in config} == config:
            log.info("toy world already at %s (seed %d); reusing it", out, seed)
            return existing
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(task, split, i) for task in tasks for split in ("train", "test")
            for i in range(config["counts"][task][split])]
    start = time.perf_counter()
    samples = []
    for task, split, i in _progress(jobs, progress):
        sample = make_sample(task, seed, i, split, size, aspect_mix)
        names = [f"images/{sample.id}_ref{k + 1}.png" for k in range(len(sample.refs))]
        for name, pixels in zip(names, sample.refs):
            _save_png(pixels, out / name)
        target = f"images/{sample.id}_target.png"
        _save_png(sample.target, out / target)
        samples.append(Sample(sample.id, task, names, sample.instruction, target, sample.plan, split))
    write_manifest(manifest_path, samples)
    info = dict(config, samples=len(samples), seconds=round(time.perf_counter() - start, 3),
                manifest="manifest.jsonl", vocabulary=vocabulary())
    write_json(info_path, info, sort_keys=True)
    return info


def _progress(items, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with the train extra; without it, no bar
        return items
    return tqdm(items, desc="toy world", unit="sample", mininterval=1.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.toy.world", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for images/, manifest.jsonl and world.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=256, help="training samples per dual task")
    parser.add_argument("--test", type=int, default=64, help="test samples per dual task")
    parser.add_argument("--single-train", type=int, default=None, help="single_edit training samples (default --train)")
    parser.add_argument("--single-test", type=int, default=None, help="single_edit test samples (default --test)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (targets are size x size "
                        "unless --aspect-mix)")
    parser.add_argument("--aspect-mix", action="store_true", help="references also 4:3 landscape/portrait")
    parser.add_argument("--tasks", nargs="+", default=list(ALL_TASKS), choices=list(TOY_TASKS),
                        help="tasks to draw (default: the five dual tasks and single_edit; two_figures_scene, "
                             "three references, only when named)")
    parser.add_argument("--force", action="store_true", help="regenerate even if the folder holds this world")
    args = parser.parse_args(argv)
    try:
        info = generate_world(args.out, args.seed, args.train, args.test, single_train=args.single_train,
                              single_test=args.single_test, size=args.size, aspect_mix=args.aspect_mix,
                              tasks=args.tasks, force=args.force)
    except ValueError as e:
        parser.error(str(e))
    print(f"{info['name']} v{info['version']}: {info['samples']} samples in {args.out} "
          f"(seed {info['seed']}, {info.get('seconds', 0):.1f} s)")
    for task in [t for t in TOY_TASKS if t in info["counts"]]:
        counts = info["counts"][task]
        print(f"  {task:17s} train {counts['train']:5d}  test {counts['test']:4d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
