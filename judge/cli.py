"""``python -m judge``: score a manifest's outputs with a judge profile; resumable.

    python -m judge --profile gpt-5 --manifest data/test.jsonl --outputs runs/eval/outputs
    python -m judge --profile toy --outputs runs/eval/outputs        # folder with manifest.jsonl
    python -m judge --list-profiles

``--outputs`` is a folder holding ``<sample id>.png`` (or .jpg/.jpeg/.webp), or a JSON/JSONL file
mapping ids to image paths ({"id": path} or lines {"id": ..., "output": ...}). Verdicts are appended
to ``<out>/verdicts.jsonl`` as they arrive; a rerun skips ids already judged and retries the rest.
``<out>/summary.json`` holds per-task means (paper Table 2 shape) and unjudged counts.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

from .config import default_profile_name, load_profiles
from .images import to_pil
from .pool import JudgePool
from .registry import load_judge
from .results import VerdictLog, summarize, write_json_atomic
from .verdict import JudgeRequest, JudgeStopped, Unjudged

log = logging.getLogger("judge.cli")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


MAX_LISTED_ERRORS = 50  # a manifest of the wrong kind would otherwise print every one of its lines


def read_manifest(path: Path, split: str | None):
    """The samples of ``split``; every bad line is listed in one error, duplicate ids are warned
    about (the first line of an id is judged, the others skipped)."""
    from .manifest import parse_line  # headless only; ComfyUI never imports this CLI

    samples, errors, first_line = [], [], {}
    duplicates: dict[str, list[int]] = {}
    with open(path) as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                sample = parse_line(line, path, line_no)
            except ValueError as e:
                errors.append(str(e))
                continue
            if sample.id in first_line:
                duplicates.setdefault(sample.id, [first_line[sample.id]]).append(line_no)
                continue
            first_line[sample.id] = line_no
            if split is None or sample.split == split:
                samples.append(sample)
    if errors:
        shown = errors[:MAX_LISTED_ERRORS]
        more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise ValueError(f"{path}: {len(errors)} bad line(s); fix them and run again:\n  " + "\n  ".join(shown) + more)
    if duplicates:
        listed = "; ".join(f"{i!r} on lines {', '.join(map(str, lines))}" for i, lines in list(duplicates.items())[:20])
        log.warning("%s: %d sample id(s) appear more than once (%s%s); each id is judged once, from its first line",
                    path, len(duplicates), listed, "; ..." if len(duplicates) > 20 else "")
    return samples


def output_index(outputs: Path) -> dict[str, Path]:
    """Sample id -> output image path, from a folder or a JSON/JSONL mapping file."""
    if outputs.is_dir():
        index = {}
        for path in sorted(outputs.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                index.setdefault(path.relative_to(outputs).with_suffix("").as_posix(), path)
        return index
    if not outputs.is_file():
        raise SystemExit(f"--outputs {outputs} is neither a folder nor a mapping file")
    text = outputs.read_text()
    if outputs.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        mapping = {str(r["id"]): r["output"] for r in rows}
    else:
        mapping = json.loads(text)
    return {str(k): (outputs.parent / v) for k, v in mapping.items()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m judge", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", help="judge profile name (default: $DUALREF_JUDGE_PROFILE or the first configured)")
    p.add_argument("--manifest", type=Path, help="manifest JSONL (default: <outputs>/manifest.jsonl)")
    p.add_argument("--outputs", type=Path, help="folder of <id>.png outputs, or a JSON/JSONL id -> path mapping")
    p.add_argument("--out", type=Path, help="results folder (default: <outputs folder>/judge/<profile>-<mode>)")
    p.add_argument("--mode", choices=["binary", "probability", "score"], help="default: the profile's mode")
    p.add_argument("--split", default=None, help="only samples of this split (train/test)")
    p.add_argument("--limit", type=int, default=None, help="judge at most this many samples")
    p.add_argument("--concurrency", type=int, default=None, help="override the profile's concurrency")
    p.add_argument("--config", type=Path, default=None, help="judges config file (default: see judge/config.py)")
    p.add_argument("--cache-dir", type=Path, default=None, help="answer cache folder")
    p.add_argument("--list-profiles", action="store_true", help="list profiles (no keys) and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def _request(sample, manifest_dir: Path, output: Path) -> JudgeRequest:
    refs = [to_pil(manifest_dir / p) for p in sample.images]
    return JudgeRequest.of(sample.instruction, refs, to_pil(output), sample_id=sample.id, task=sample.task,
                           plan=sample.plan)


def run(args) -> dict:
    profiles = load_profiles(args.config)
    if args.list_profiles:
        for name, profile in sorted(profiles.items()):
            print(json.dumps(profile.public_dict(), sort_keys=True))
        return {}
    if args.outputs is None:
        raise SystemExit("--outputs is required (a folder of <id>.png, or an id -> path mapping file)")
    name = args.profile or default_profile_name(profiles)
    manifest = args.manifest or (args.outputs / "manifest.jsonl" if args.outputs.is_dir() else None)
    if manifest is None or not manifest.is_file():
        raise SystemExit(f"no manifest: pass --manifest (looked for {manifest})")
    overrides = {k: v for k, v in (("concurrency", args.concurrency), ("cache_dir", args.cache_dir and str(args.cache_dir))) if v}
    if args.mode in ("binary", "probability"):
        overrides["mode"] = args.mode
    judge = load_judge(name, config=args.config, **overrides)
    mode = args.mode or judge.mode
    if mode == "score" and not hasattr(judge, "submit_score"):
        raise SystemExit(f"profile {name!r} ({judge.name}) has no 0-10 score mode; use an HTTP (openai-kind) profile")
    out = args.out or (args.outputs if args.outputs.is_dir() else args.outputs.parent) / "judge" / f"{name}-{mode}"
    verdict_log = VerdictLog(out / "verdicts.jsonl")
    samples = read_manifest(manifest, args.split)[: args.limit]
    index = output_index(args.outputs)
    done = verdict_log.done_ids()
    todo = [s for s in samples if s.id not in done]
    log.info("judge %s (%s): %d samples, %d already judged, %d to do", name, judge.name, len(samples), len(samples) - len(todo), len(todo))
    pool = JudgePool(judge)
    submit = judge.submit_score if mode == "score" else pool.submit
    window = 4 * max(1, getattr(getattr(judge, "profile", None), "concurrency", 2))
    base = {"profile": name, "judge": judge.name, "mode": mode}
    started = time.monotonic()
    try:
        _judge_all(todo, manifest.parent, index, submit, verdict_log, base, window, not args.quiet, abort=pool.abort)
    finally:
        pool.close()
        accounting = getattr(judge, "accounting", None)
        judge.close()
        samples_ids = {s.id for s in samples}
        records = {i: r for i, r in verdict_log.records().items() if i in samples_ids}
        extra = {**base, "manifest": str(manifest), "n_samples": len(samples), "wall_s": time.monotonic() - started}
        if accounting is not None:
            extra["usage_this_run"] = accounting.snapshot()
        summary = summarize(records, mode, extra)
        write_json_atomic(out / "summary.json", summary)
        log.info("wrote %s and %s", verdict_log.path, out / "summary.json")
    return summary


class _NoBar:  # without tqdm (it comes with the train extra) the run is the same, only quieter
    def __init__(self, total=None, **_):
        self.n = 0

    def update(self, n):
        self.n += n

    def close(self):
        pass


def _judge_all(todo, manifest_dir, index, submit, verdict_log, base, window, progress=True, abort=None):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = _NoBar

    pending = {}
    bar = tqdm(total=len(todo), desc=f"judge {base['profile']}", unit="sample", file=sys.stderr,
               disable=not progress)
    try:
        for sample in todo:
            output = index.get(sample.id)
            if output is None or not Path(output).is_file():
                verdict_log.append({**base, "id": sample.id, "task": sample.task, "status": "missing",
                                    "reason": f"no output image for {sample.id!r}"})
                bar.update(1)
                continue
            try:
                request = _request(sample, manifest_dir, Path(output))
            except ValueError as e:
                verdict_log.append({**base, "id": sample.id, "task": sample.task, "status": "bad_input", "reason": str(e)})
                bar.update(1)
                continue
            pending[submit(request)] = (sample, str(output))
            while len(pending) >= window:
                _drain(pending, verdict_log, base, bar, FIRST_COMPLETED)
        while pending:
            _drain(pending, verdict_log, base, bar, FIRST_COMPLETED)
    except (KeyboardInterrupt, JudgeStopped) as stop:
        # Ctrl-C: walk away from in-flight requests at once. A refused profile: nothing more is sent.
        for future in pending:
            future.cancel()
        if isinstance(stop, KeyboardInterrupt) and abort is not None:
            abort()
        _drain(pending, verdict_log, base, bar, None)  # keep what already came back
        if isinstance(stop, KeyboardInterrupt):
            log.warning("interrupted: %d samples in flight were not recorded; rerun the same command to resume",
                        len(pending))
        raise
    finally:
        bar.close()


def _drain(pending, verdict_log, base, bar, how):
    """Record finished samples: those ``wait`` returns (``how``), or with ``how=None`` those already
    done. A JudgeStopped answer is not recorded (the sample was not judged; a rerun does it) but
    raised once the others are recorded."""
    done = [f for f in pending if f.done()] if how is None else wait(list(pending), return_when=how)[0]
    stopped = None
    for future in done:
        if future.cancelled():
            continue
        sample, output = pending.pop(future)
        record = {**base, "id": sample.id, "task": sample.task, "output": output}
        try:
            result = future.result()
            key = "score" if base["mode"] == "score" else "verdict"
            record.update(status="judged", **{key: result.to_dict()})
        except JudgeStopped as failure:
            stopped = stopped or failure
            continue
        except Unjudged as failure:
            record.update(status="unjudged", reason=failure.reason)
        except ValueError as e:  # the judge refused this sample's input (e.g. the toy judge without a plan)
            record.update(status="bad_input", reason=str(e))
        verdict_log.append(record)
        bar.update(1)
    if stopped is not None and how is not None:
        raise stopped


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run(args)
    except ValueError as e:  # ProfileError, ManifestError, a bad mapping file: the message names the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JudgeStopped as e:  # a rejected key, an unknown model: every further request would fail too
        print(f"error: the judge stopped after the server refused the profile: {e.reason}. Nothing more was "
              "sent; fix the profile and rerun the same command to judge the rest", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: summary.json holds what was judged; rerun the same command to resume", file=sys.stderr)
        return 130
    if summary:
        overall = summary["overall"]
        print(json.dumps({"table2": summary["table2"], "overall": overall}, indent=2))
    return 0
