"""The toy world's tables: judge a model (+ LoRA) on a split under a layout, cache the result, print it.

What ``python -m training.toy`` prints: the base Table in the paper's Table-2 shape (five tasks + the
mean reward, ToyJudge, deterministic ODE sampling) for each layout, and with ``--sft-table`` base
vs SFT per layout. Every evaluation is kept as JSON under ``<out>/evals/``, named by a hash of what
decides it (model weights, LoRA file, manifest, split, layout, sampling, judge mode), so a rerun
reads it back instead of sampling again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from judge.results import TABLE2_COLUMNS
from judge.toy import ToyJudge

from ..evaluation import sample_split
from ..files import file_digest, write_json
from ..models import load_kontext

log = logging.getLogger(__name__)

QUESTIONS = ("fidelity", "consistency", "realism", "reward")


def summarise(rows: list[tuple[str, dict]]) -> dict:
    """``rows``: (task, verdict dict) -> {task: {question: mean, "n": count}, "mean": over every sample}."""
    by_task: dict[str, list[dict]] = {}
    for task, verdict in rows:
        by_task.setdefault(task, []).append(verdict)
    out = {task: {q: float(np.mean([v[q] for v in vs])) for q in QUESTIONS} | {"n": len(vs)}
           for task, vs in by_task.items()}
    every = [v for vs in by_task.values() for v in vs]
    out["mean"] = {q: float(np.mean([v[q] for v in every])) for q in QUESTIONS} | {"n": len(every)}
    return out


def evaluate(model_dir, manifest, out_dir, *, layout: str, split: str = "test", lora=None, tasks=None,
             judge_mode: str = "binary", steps: int | None = None, seed: int = 0, bundle=None,
             progress: bool = True, with_samples: bool = False):
    """Judged summary (:func:`summarise`) of ``model_dir`` (+ ``lora``) on ``split`` under ``layout``,
    cached in ``out_dir`` (``eval-<key>.json``); ``bundle``: the loaded model, or a function that
    returns it (called only when the result is not cached). ``with_samples``: return
    ``(summary, per-sample verdicts)`` instead, for :func:`paired_gains`."""
    model_dir, manifest = Path(model_dir), Path(manifest)
    settings = json.loads((model_dir / "dualref.json").read_text())
    identity = {"model": settings.get("fingerprint") or str(model_dir), "lora": file_digest(lora) if lora else None,
                "manifest": file_digest(manifest), "split": split, "layout": layout, "tasks": sorted(tasks or []),
                "judge": judge_mode, "steps": steps, "seed": seed}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(out_dir) / f"eval-{key}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if not with_samples:
            return saved["summary"]
        if "samples" in saved:  # files written before per-sample verdicts were kept are judged again
            return saved["summary"], saved["samples"]

    start = time.perf_counter()
    bundle = bundle() if callable(bundle) else bundle or load_kontext(model_dir)
    outputs = sample_split(bundle, manifest, split=split, lora=lora, layout=layout, tasks=tasks, steps=steps,
                           seed=seed, max_pixels=size_limit(manifest), progress=progress)
    judge = ToyJudge(judge_mode)
    rows, per_sample = [], []
    for o in outputs:
        verdict = judge.judge(o.judge_request())
        scores = {"fidelity": verdict.fidelity, "consistency": verdict.consistency, "realism": verdict.realism,
                  "reward": verdict.reward}
        rows.append((o.sample.task, scores))
        per_sample.append({"id": o.sample.id, "task": o.sample.task, **scores})
    summary = summarise(rows)
    # Per-sample verdicts too, so a table can be broken down (by operation, scale, place) afterwards.
    write_json(path, {"identity": identity, "summary": summary, "samples": per_sample,
                      "seconds": round(time.perf_counter() - start, 1)}, sort_keys=True)
    return (summary, per_sample) if with_samples else summary


def size_limit(manifest: Path) -> int:
    """The area at which toy images are kept as they are (no resizing): the world's own size."""
    try:
        size = json.loads((manifest.parent / "world.json").read_text())["size"]
    except (OSError, ValueError, KeyError):
        size = 64
    return size * size


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def table2_markdown(rows: list[tuple[str, dict]], tasks=tuple(TABLE2_COLUMNS)) -> str:
    """A markdown Table 2: one row per (label, summary); cells are mean rewards, then the mean."""
    header = ["Model"] + [TABLE2_COLUMNS.get(t, t) for t in tasks] + ["Mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for label, summary in rows:
        cells = [_cell(summary.get(t, {}).get("reward")) for t in tasks] + [_cell(summary["mean"]["reward"])]
        lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines)


def questions_markdown(label: str, summary: dict) -> str:
    """Per task: fidelity / consistency / realism / reward and the sample count."""
    lines = [f"| {label} | Fidelity | Consistency | Realism | Reward | n |", "|---|---:|---:|---:|---:|---:|"]
    for task, block in summary.items():
        lines.append(f"| {TABLE2_COLUMNS.get(task, task)} | " + " | ".join(_cell(block[q]) for q in QUESTIONS)
                     + f" | {block['n']} |")
    return "\n".join(lines)


def wins(base: dict, sft: dict, tasks=tuple(TABLE2_COLUMNS)) -> list[str]:
    """The tasks where ``sft``'s mean reward is strictly above ``base``'s."""
    return [t for t in tasks if t in sft and sft[t]["reward"] > base.get(t, {}).get("reward", float("inf"))]


def paired_gains(base: list[dict], other: list[dict], tasks=tuple(TABLE2_COLUMNS)) -> dict:
    """Per task, ``other``'s reward minus ``base``'s over the samples both judged (paired by id: the same
    references, instruction and starting noise): ``{task: (mean, standard error, n)}``. The pairing
    removes most of the between-sample spread, so a gain of two standard errors is not test-split luck."""
    by_id = {(s["task"], s["id"]): s["reward"] for s in base}
    out = {}
    for task in tasks:
        diffs = np.array([s["reward"] - by_id[(task, s["id"])] for s in other
                          if s["task"] == task and (task, s["id"]) in by_id])
        if diffs.size:
            se = float(diffs.std(ddof=1) / np.sqrt(diffs.size)) if diffs.size > 1 else float("nan")
            out[task] = (float(diffs.mean()), se, int(diffs.size))
    return out


def gains_markdown(rows: list[tuple[str, dict]], tasks=tuple(TABLE2_COLUMNS)) -> str:
    """A markdown table of :func:`paired_gains` rows: ``+mean ± se`` per task."""
    header = ["Gain"] + [TABLE2_COLUMNS.get(t, t) for t in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(tasks)) + "|"]
    for label, gains in rows:
        cells = [f"{gains[t][0]:+.3f} ± {gains[t][1]:.3f}" if t in gains else "-" for t in tasks]
        lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines)
