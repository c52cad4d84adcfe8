"""Where does a toy model's edit appear? One-step predictions at fixed noise levels, judged.

    python -m training.toy.probe                       # the default toy base on its single_edit test split
    python -m training.toy.probe --model DIR --manifest runs/toy/world/manifest.jsonl --lora sft.safetensors
    python -m training.toy.probe --sigmas 1 0.8 --grid probe.png   # ... and a picture of the predictions

For each test sample the target latent is noised to ``sigma`` (one fixed noise per sample), the
model predicts the clean latent in one step (x0 = x_sigma - sigma * velocity), and ToyJudge measures
the decoded prediction. The table gives the mean of each fidelity check per operation (single
edits) or task. With ``--shuffled`` the same inputs go in with another sample's instruction: if the
checks drop, the model reads the instruction; if they stay, it reads the edit off the noisy latent.
At sigma 1 nothing of the target is left, so the row says whether the model can start an edit from
the instruction alone, which is what ODE sampling from pure noise needs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from judge.toy import THRESHOLDS, ToyJudge

from ..data import to_uint8
from ..evaluation import SampleOutput, applied_loras, by_bucket, cached_split, image_grid
from ..flow import FlowMatchingModel
from ..models import load_kontext
from .base import single_world, toy_base

CHECKS = {"presence": "placed", "appearance": "colour", "vacated": "vacated", "changed": "changed", "preserve": "kept"}
DEFAULT_SIGMAS = (1.0, 0.9, 0.8, 0.6)


@torch.no_grad()
def one_step_prediction(model, batch, sigma: float, noise: torch.Tensor, shuffled: bool = False) -> torch.Tensor:
    """x0 predicted from the target noised to ``sigma``; ``shuffled`` rolls the instructions by one sample."""
    order = torch.roll(torch.arange(len(batch.prompt_embeds)), 1) if shuffled else slice(None)
    noisy = (1 - sigma) * batch.target + sigma * noise
    sigmas = torch.full((len(noisy),), float(sigma))
    velocity = model.velocity(noisy, batch.refs, batch.prompt_embeds[order], batch.pooled[order], sigmas)
    return noisy - sigma * velocity


def probe(model_dir, manifest, *, sigmas=DEFAULT_SIGMAS, shuffled=(0.8,), lora=None, layout: str = "diagonal",
          split: str = "test", limit: int | None = 64, seed: int = 0, batch_size: int = 32, grid=None,
          grid_per_group: int = 2) -> dict:
    """``{(sigma, shuffled): {group: {check: mean, "n": count}}}`` over ``split`` (``limit`` samples);
    ``shuffled``: the sigmas also probed with rolled instructions. ``grid``: also write a PNG there
    (:func:`write_grid`) with the first ``grid_per_group`` samples of each group."""

    bundle = load_kontext(model_dir)
    entries, dataset = cached_split(bundle, manifest, split, limit=limit, require_target=True, progress=False)
    if not entries or not all(e.record.sample.plan for e in entries):
        raise ValueError(f"{manifest}: the probe needs {split} samples with a target and a DualShapes plan (ToyJudge "
                         "measures against the plan); use a toy world's manifest.jsonl")
    model = FlowMatchingModel(bundle.transformer, layout=layout, guidance=bundle.settings["sampling"]["guidance"])
    judge = ToyJudge("binary")
    values: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    counts: dict = defaultdict(lambda: defaultdict(int))
    runs = [(s, False) for s in sigmas] + [(s, True) for s in shuffled]
    grid_rows: dict = {}  # sample index -> [references, target, one prediction per run]
    if grid:  # the first grid_per_group samples of each group
        picked = Counter()
        for i, entry in enumerate(entries):
            group = _group(entry.record.sample)
            picked[group] += 1
            if picked[group] <= grid_per_group:
                grid_rows[i] = []
    with applied_loras(bundle, [(lora, 1.0)] if lora else []):
        for chunk in by_bucket(dataset, range(len(dataset)), batch_size):  # equal shapes stack
            batch = dataset.batch(chunk)
            noise = torch.stack([torch.randn(tuple(batch.target.shape[1:]),  # one noise per sample, any batching
                                             generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                                 for i in chunk])
            # references read from disk once per sample; only the output changes with the noise level
            requests = [SampleOutput(entries[i].record, None, layout, None).judge_request() for i in chunk]
            for sigma, rolled in runs:
                pixels = bundle.decode_latents(one_step_prediction(model, batch, sigma, noise, rolled))
                for i, request, image in zip(chunk, requests, pixels):
                    group = _group(entries[i].record.sample)
                    output = to_uint8(image)
                    if i in grid_rows:
                        if not grid_rows[i]:  # the inputs, once
                            inputs = [request.reference1, request.reference2, Image.open(entries[i].record.target)]
                            grid_rows[i] += [np.asarray(im.convert("RGB")) for im in inputs if im is not None]
                        grid_rows[i].append(output)
                    measured = judge.measure(dataclasses.replace(request, output=output))
                    # a check asked by two questions (style's presence) is one measurement
                    checks = {name: value for question in measured.values() for name, value, _ in question}
                    counts[(sigma, rolled)][group] += 1
                    for name in CHECKS:
                        if name in checks:
                            values[(sigma, rolled)][group][name].append(checks[name])
    if grid:
        order = sorted(grid_rows, key=lambda i: (_group(entries[i].record.sample), i))
        inputs = ["image 1", "image 2"][:len(entries[order[0]].record.refs)] + ["target"]
        write_grid(grid, [grid_rows[i] for i in order],
                   inputs + [f"{sigma:g}{' shuffled' if rolled else ''}" for sigma, rolled in runs],
                   [_group(entries[i].record.sample) for i in order])
    return {run: {group: {name: float(np.mean(v)) for name, v in cell.items()} | {"n": counts[run][group]}
                  for group, cell in sorted(groups.items())} for run, groups in values.items()}


def _group(sample) -> str:
    """A sample's row of the table: the single edit's operation, else the task."""
    return sample.plan.get("roles", {}).get("op") or sample.task


def write_grid(path, rows: list[list[np.ndarray]], columns: list[str], labels: list[str], scale: int = 2) -> Path:
    """:func:`training.evaluation.image_grid` of (H, W, 3) uint8 tiles, one row per sample, each tile
    enlarged ``scale`` times without smoothing; column titles above, each row's label at its left."""
    from PIL import ImageDraw

    pad, head = 4, 14
    grid = image_grid([[tile.repeat(scale, 0).repeat(scale, 1) for tile in tiles] for tiles in rows], pad=pad)
    cell_w, cell_h = (grid.width - pad) // len(columns) - pad, (grid.height - pad) // len(rows) - pad
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max(64, 8 + max(int(measure.textlength(label)) for label in labels))  # room for the longest label
    canvas = Image.new("RGB", (left - pad + grid.width, head - pad + grid.height), "white")
    canvas.paste(grid, (left - pad, head - pad))  # tiles start at (left, head)
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(columns):
        draw.text((left + c * (cell_w + pad), 2), title, fill="black")
    for r, label in enumerate(labels):
        draw.text((2, head + r * (cell_h + pad) + cell_h // 2 - 5), label, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def probe_markdown(result: dict) -> str:
    """One row per (sigma, instruction), one cell per group: its checks' means (``CHECKS`` names them:
    placed = presence, the edited object's mask where planned; colour = appearance; vacated = the old
    spot shows background; changed = pixels moved towards the target; kept = preserve, the rest
    unchanged)."""
    groups = sorted({g for groups in result.values() for g in groups})
    lines = ["| sigma | instruction | " + " | ".join(groups) + " |", "|---:|---|" + "---|" * len(groups)]
    for (sigma, rolled), by_group in sorted(result.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        cells = [" ".join(f"{CHECKS[name]} {v:.2f}" for name, v in by_group[g].items() if name != "n")
                 if g in by_group else "-" for g in groups]
        lines.append(f"| {sigma:g} | {'shuffled' if rolled else 'own'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.toy.probe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--model", type=Path, help="model folder (default: the toy base, built if absent)")
    p.add_argument("--manifest", type=Path, help="default: the toy base's own single_edit world")
    p.add_argument("--lora", type=Path, help="a DualRef LoRA file to apply")
    p.add_argument("--layout", default="diagonal", choices=("offset", "index", "diagonal", "uxo"))
    p.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULT_SIGMAS))
    p.add_argument("--shuffled", type=float, nargs="*", default=[0.8],
                   help="sigmas also probed with another sample's instruction (default 0.8)")
    p.add_argument("--limit", type=int, default=64, help="test samples (default 64)")
    p.add_argument("--grid", type=Path, help="also write a PNG here: two samples per group, the references, "
                   "the target and each probed prediction")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for s in args.sigmas + args.shuffled:
        if not 0.0 <= s <= 1.0:
            p.error(f"sigma {s} is outside [0, 1]")
    model = args.model
    if model is None:

        model = toy_base()
    manifest = args.manifest or single_world(json.loads((model / "dualref.json").read_text()), progress=False)
    try:
        result = probe(model, manifest, sigmas=args.sigmas, shuffled=args.shuffled, lora=args.lora,
                       layout=args.layout, limit=args.limit, grid=args.grid)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"One-step predictions of {model.name} ({args.layout}) on {manifest}: mean of each check")
    print(probe_markdown(result))
    if args.grid:
        print(f"grid of predictions: {args.grid}")

    print("ToyJudge passes at " + ", ".join(f"{short} >= {THRESHOLDS[name][0]:g}" for name, short in CHECKS.items())
          + " (placed: presence; colour: appearance; kept: preserve)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
