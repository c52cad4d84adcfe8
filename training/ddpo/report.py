"""The main job's last stage: base / SFT / SFT+DDPO on the held-out split (the benchmark's own code:
deterministic ODE sampling, the judge, resumable run folders), the Table-2 summary, the reward curve
and the sample grid.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from judge.manifest import TASKS
from judge.results import TABLE2_COLUMNS

from ..bench.cli import Judging, bench_run, judge_modes
from ..bench.generators import HeadlessGenerator
from ..bench.report import compare_tables, table_text, write_report, write_tables
from ..bench.run_folder import RunDir, select_samples
from ..evaluation import image_grid
from ..files import cache_dir_for, write_json
from ..lora_io import load_lora
from ..models import load_model
from .config import DDPOConfig

log = logging.getLogger(__name__)

MODELS = (("base", "Base"), ("sft", "SFT"), ("sft_ddpo", "SFT+DDPO"))


def evaluate_and_report(cfg: DDPOConfig, out: Path, sft_lora: Path, ddpo_lora: Path, device="cpu",
                        accelerator=None) -> dict | None:
    """Generate and judge the three models (reusing whatever an earlier run already made), write
    ``summary.json`` / ``summary.md`` / ``report.html`` / ``grid.png`` / ``reward_curve.png``, print
    the table, return ``summary.json``'s content. Runs on ``device`` in the run's precision.

    With an ``accelerator`` of several processes every process calls this and samples its share of
    the batches (:func:`training.bench.cli.bench_run`); the main process judges, writes the files and
    returns the summary, the others return None."""

    e = cfg.eval
    manifest = Path(cfg.data.manifest)
    cache = cache_dir_for(manifest, cfg.data.cache_dir)
    tasks = cfg.data.tasks or list(TASKS)
    judging = Judging(config=cfg.judge.config, mode=e.mode, quiet=not cfg.run.progress)
    judges = judge_modes(judging, e.judges or [cfg.judge.profile])
    bundle = load_model(cfg.model, device=device, precision=cfg.run.precision)
    loras = {"base": [], "sft": [(sft_lora, 1.0)], "sft_ddpo": [(sft_lora, 1.0), (ddpo_lora, 1.0)]}
    layout = cfg.run.layout or _lora_layout(sft_lora)
    runs, results = [], {}
    for name, label in MODELS:
        generator = HeadlessGenerator(bundle=bundle, loras=loras[name], layout=layout, steps=cfg.rollout.eval_steps,
                                      seed=0, batch_size=e.batch_size, cache_dir=cache, max_pixels=cfg.data.max_pixels,
                                      progress=cfg.run.progress)
        selected = select_samples(manifest, e.split, tasks, e.limit_per_task, seed=0)
        run = RunDir(out / "eval" / name)
        results[name] = (label, bench_run(run, selected, manifest, generator, label, judges, judging, e.split,
                                          accelerator=accelerator), run)
        runs.append(run)
    if accelerator is not None and not accelerator.is_main_process:
        return None
    key = f"{judges[0][0]}-{judges[0][1]}"
    summary = {name: table2_dict(summaries[key]) for name, (_, summaries, _) in results.items()}
    tables = compare_tables([(label, summaries) for label, summaries, _ in results.values()])
    # summary.md is the table; summary.json exactly the Table-2 dict; the full tables go to table2.json
    write_tables(out, "table2", tables, {"summary": summary, "judge": key})
    (out / "table2.md").replace(out / "summary.md")
    write_json(out / "summary.json", summary)  # keys in the given order: tasks as the paper's, "mean" last
    write_report(out / "report.html", f"DualRef main job - {out.name}", runs, tables)
    sample_grid(out / "grid.png", runs, results["base"][2], e.grid_per_task)
    reward_curve(out / "metrics.jsonl", out / "reward_curve.png", summary)
    print()
    print(table_text(tables))
    return summary


def _lora_layout(path: Path) -> str:
    meta = load_lora(path)[1]
    return meta.layout if meta is not None else "diagonal"


def table2_dict(summary: dict) -> dict:
    """``{<task>: mean reward, ..., "mean": over every judged sample}`` (tasks in the paper's order)."""
    tasks = summary.get("tasks", {})
    ordered = [t for t in TABLE2_COLUMNS if t in tasks] + sorted(t for t in tasks if t not in TABLE2_COLUMNS)
    row = {t: tasks[t].get("reward") for t in ordered}
    row["mean"] = summary.get("overall", {}).get("reward")
    return row


def sample_grid(path: Path, runs, base_run, per_task: int) -> Path | None:
    """Rows: ``per_task`` test samples of each task; columns: ref 1, ref 2, base, SFT, SFT+DDPO, target."""
    from PIL import Image, ImageDraw

    samples, counts = [], {}
    for s in base_run.samples():
        if counts.get(s.task, 0) < per_task:
            counts[s.task] = counts.get(s.task, 0) + 1
            samples.append(s)
    if not samples:
        return None
    header = ["ref 1", "ref 2"] + [label for _, label in MODELS] + ["target"]
    rows = []
    for s in samples:
        tiles = [_tile(base_run.root / p) for p in s.images[:2]]
        tiles += [_tile(run.output_path(s.id)) for run in runs]
        tiles.append(_tile(base_run.root / s.target) if s.target else _blank(tiles[0]))
        rows.append(tiles)
    grid = image_grid(rows)
    width = grid.width // len(header)
    canvas = Image.new("RGB", (grid.width, grid.height + 14), "white")
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(header):
        draw.text((k * width + 3, 1), text, fill="black")
    canvas.paste(grid, (0, 14))
    canvas.save(path)
    return path


def _tile(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError:  # no output for this sample (generator error): a grey tile, not a crash
        return np.full((64, 64, 3), 160, np.uint8)


def _blank(like: np.ndarray) -> np.ndarray:
    return np.full_like(like, 255)


def reward_curve(metrics: Path, path: Path, summary: dict | None = None) -> Path | None:
    """Rollout reward per iteration (and its running mean), the held-out ODE check, and the test-split
    results of the three models as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["reward"]) for r in rows if r.get("reward") is not None]
    held = [(r["step"], r["eval_reward"]) for r in rows if r.get("eval_reward") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        x, y = zip(*train)
        ax.plot(x, y, ".", alpha=0.35, color="tab:blue", label="rollout reward (SDE)")
        window = max(1, min(len(y) // 3, max(3, len(y) // 10)))  # a few iterations, even on short runs
        smooth = np.convolve(y, np.ones(window) / window, mode="valid")
        ax.plot(x[window - 1:], smooth, color="tab:blue", label=f"rollout reward, mean of {window}")
    if held:
        x, y = zip(*held)
        ax.plot(x, y, "o-", color="tab:orange", label="held-out training tuples (ODE)")
    colours = {"base": "tab:gray", "sft": "tab:green", "sft_ddpo": "tab:red"}
    for name, label in MODELS:
        mean = (summary or {}).get(name, {}).get("mean")
        if mean is not None:
            ax.axhline(mean, ls="--", color=colours[name], label=f"test split, {label}: {mean:.3f}")
    ax.set_xlabel("DDPO iteration")
    ax.set_ylabel("judge reward (mean of 3 answers)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", ncol=2)  # the curves live in the lower half early on
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
