"""One benchmark run folder: the selected samples, their outputs, the generation log, the judges' results.

    <run>/run.json            what made the outputs (generator, model, LoRAs, layout, steps, seed) + label
    <run>/manifest.jsonl      the selected samples (DESIGN contract 5), paths relative to <run>
    <run>/outputs/<id>.png    one output per sample; an existing file is reused, never regenerated
    <run>/generated.jsonl     one line per generation attempt {id, task, seed, status ok|error, reason};
                              the last line for an id wins, so a rerun retries the errors
    <run>/judge/<profile>-<mode>/verdicts.jsonl, summary.json    written by the judge CLI's own code

Judging is ``python -m judge`` (judge/cli.py) on ``--manifest <run>/manifest.jsonl --outputs
<run>/outputs``, so a run can be re-judged by hand with the same files and the same resume rules.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from judge.cli import parse_args, run
from judge.config import load_profiles
from judge.manifest import ManifestError, Sample, parse_line, write_manifest
from judge.registry import load_judge
from judge.results import VerdictLog, write_json_atomic

from ..files import atomic_path
from ..seeds import sample_seed

log = logging.getLogger(__name__)



class BenchError(ValueError):
    """A benchmark that cannot run as asked; the message names the thing and the fix."""


@dataclass
class Selected:
    """A sample chosen for the run; ``index`` is its position among the split's samples of the chosen
    tasks (before any limit), so its seed does not depend on ``--limit-per-task`` or on resuming."""

    sample: Sample  # paths relative to the source manifest; RunDir.prepare makes them relative to the run
    index: int
    seed: int

    @property
    def id(self) -> str:
        return self.sample.id


def select_samples(manifest, split: str | None, tasks, limit_per_task: int | None, seed: int) -> list[Selected]:
    """The samples of ``split`` and ``tasks`` (manifest order), at most ``limit_per_task`` of each task.

    A line that is not a valid sample stops the run (ManifestError names file:line); a missing image
    does not: that sample's generation fails and is reported.
    """
    manifest = Path(manifest)
    try:
        lines = manifest.read_text().splitlines()
    except OSError as e:
        raise BenchError(f"cannot read the manifest {manifest} ({e.strerror}); pass --manifest <file.jsonl>, "
                         "or no --manifest for the toy world") from None
    chosen, seen, per_task, index, found = [], {}, {}, 0, {}
    for line_no, text in enumerate(lines, 1):
        if not text.strip():
            continue
        sample = parse_line(text, manifest, line_no)
        found.setdefault((sample.split, sample.task), 0)
        found[(sample.split, sample.task)] += 1
        if (split is not None and sample.split != split) or sample.task not in tasks:
            continue
        if sample.id in seen:
            raise ManifestError(manifest, line_no, f"duplicate id {sample.id!r} (first on line {seen[sample.id]}); "
                                "outputs are stored by id, so ids must be unique")
        seen[sample.id] = line_no
        if limit_per_task is None or per_task.get(sample.task, 0) < limit_per_task:
            per_task[sample.task] = per_task.get(sample.task, 0) + 1
            chosen.append(Selected(sample, index, sample_seed(seed, index)))
        index += 1
    if not chosen:
        have = ", ".join(f"{t} ({s}): {n}" for (s, t), n in sorted(found.items())) or "no samples"
        raise BenchError(f"{manifest} has no {split or 'any'}-split samples of {', '.join(tasks)}; it has {have}")
    return chosen


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


class RunDir:
    def __init__(self, root):
        self.root = Path(root)
        self.outputs = self.root / "outputs"
        self.manifest = self.root / "manifest.jsonl"
        self.generated = self.root / "generated.jsonl"
        self.info_path = self.root / "run.json"
        self._log = VerdictLog(self.generated)  # same append-only, fsynced, last-line-wins JSONL

    # -- setup --------------------------------------------------------------------------------------
    def prepare(self, selected: list[Selected], source_manifest, identity: dict, label: str, extra=None,
                write: bool = True) -> None:
        """Write the run's manifest and run.json; refuse to mix outputs of another generator setting.
        ``write=False`` (the other processes of a sharded run, after the main one prepared the folder):
        only make ``selected``'s paths relative to the run, as the written manifest has them."""
        if not write:
            for s, rewritten in zip(selected, self._run_samples(selected, source_manifest)):
                s.sample = rewritten
            return
        info = self.info()
        unverified = sorted(k for k, v in (identity.get("files") or {}).items() if v.get("unverified"))
        if unverified and self.output_ids():
            raise BenchError(f"{self.root} holds outputs, and the server cannot say whether {', '.join(unverified)} "
                             "changed since they were made (no /experiment/models listing); pass another --out, "
                             "or delete the folder to start over")
        if info and info.get("identity") != identity and self.output_ids():
            old = info.get("identity", {})
            changed = sorted(k for k in set(identity) | set(old) if identity.get(k) != old.get(k))
            files = identity.get("files") or {}
            changed += sorted(k for k in set(files) | set(old.get("files") or {})
                              if files.get(k) != (old.get("files") or {}).get(k))
            raise BenchError(f"{self.root} holds outputs made with other settings ({', '.join(changed)} differ); "
                             "pass another --out, or delete the folder to start over")
        if info and info.get("identity") != identity:  # no outputs left: earlier verdicts judged other images
            stamp = int(time.time())
            for old in (self.root / "judge", self.generated):
                if old.exists():
                    old.rename(old.with_name(f"{old.name}.stale-{stamp}"))
                    log.warning("settings changed: moved %s aside (%s.stale-%d)", old, old.name, stamp)
        source = Path(source_manifest)
        samples = self._run_samples(selected, source)
        self.root.mkdir(parents=True, exist_ok=True)
        self.outputs.mkdir(exist_ok=True)
        write_manifest(self.manifest, samples)
        for s, rewritten in zip(selected, samples):
            s.sample = rewritten
        write_json_atomic(self.info_path, {**(info or {}), **(extra or {}), "label": label, "identity": identity,
                                           "source_manifest": str(source.resolve()), "samples": len(selected),
                                           "tasks": sorted({s.sample.task for s in selected})})

    def _run_samples(self, selected: list[Selected], source_manifest) -> list[Sample]:
        source = Path(source_manifest)

        def rel(p: str) -> str:  # manifest-relative -> run-relative (absolute paths stay absolute)
            return p if Path(p).is_absolute() else _relative(source.parent / p, self.root)

        return [Sample(s.sample.id, s.sample.task, [rel(p) for p in s.sample.images], s.sample.instruction,
                       rel(s.sample.target) if s.sample.target else None, s.sample.plan, s.sample.split)
                for s in selected]

    def info(self) -> dict:
        try:
            return json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return {}

    def label(self) -> str:
        return self.info().get("label") or self.root.name

    def samples(self) -> list[Sample]:
        """The run's samples (paths relative to the run folder)."""
        if not self.manifest.is_file():
            raise BenchError(f"{self.root} is not a benchmark run folder (no manifest.jsonl); "
                             "pass folders written by python -m training.bench")
        return [parse_line(t, self.manifest, n) for n, t in enumerate(self.manifest.read_text().splitlines(), 1)
                if t.strip()]

    # -- outputs ------------------------------------------------------------------------------------
    def output_path(self, sample_id: str) -> Path:
        path = self.outputs / f"{sample_id}.png"
        if self.outputs.resolve() not in path.resolve().parents:
            raise BenchError(f"sample id {sample_id!r} is not usable as a file name; rename it in the manifest")
        return path

    def output_ids(self) -> set[str]:
        if not self.outputs.is_dir():
            return set()
        return {p.relative_to(self.outputs).with_suffix("").as_posix() for p in self.outputs.rglob("*.png")}

    def save_output(self, sample_id: str, image) -> Path:
        """Write one output atomically (a killed run leaves no half PNG that a rerun would trust).

        ``image``: HxWx3 uint8 array, PIL image, or the path of a downloaded file.
        """
        from PIL import Image

        path = self.output_path(sample_id)
        with atomic_path(path) as tmp:
            if isinstance(image, (str, os.PathLike)):
                with Image.open(image) as im:
                    if im.format == "PNG":  # keep it byte for byte (ComfyUI's embedded workflow included)
                        tmp.write_bytes(Path(image).read_bytes())
                    else:
                        im.convert("RGB").save(tmp, format="PNG")
            else:
                pil = image if isinstance(image, Image.Image) else Image.fromarray(image, "RGB")
                pil.save(tmp, format="PNG")
        return path

    # -- generation log -----------------------------------------------------------------------------
    def log_generation(self, selected: Selected, generator: str, error: str | None, seconds: float,
                       rank: int | None = None) -> dict:
        """Append one line to generated.jsonl and return it; ``rank`` (a sharded run's process that
        generated the sample): the line is only returned, for the main process to append."""
        record = {"id": selected.id, "task": selected.sample.task, "seed": selected.seed,
                  "generator": generator, "status": "ok" if error is None else "error",
                  "reason": error, "seconds": round(seconds, 4), "time": time.time()}
        if rank is None:
            self._log.append(record)
        else:
            record["rank"] = rank
        return record

    def append_generation(self, record: dict) -> None:
        self._log.append(record)

    def generation_records(self) -> dict[str, dict]:
        return self._log.records()

    # -- judging ------------------------------------------------------------------------------------
    def judge_dir(self, profile: str, mode: str) -> Path:
        return self.root / "judge" / f"{profile}-{mode}"

    def judge(self, profile: str, mode: str, mode_override: str | None = None, config=None,
              concurrency: int | None = None, quiet: bool = False) -> dict:
        """Judge every output with the judge CLI's own loop (resumable); returns its summary, plus
        the generator's reason for each sample without an output."""

        argv = ["--profile", profile, "--manifest", str(self.manifest), "--outputs", str(self.outputs),
                "--out", str(self.judge_dir(profile, mode))]
        argv += ["--mode", mode_override] if mode_override else []
        argv += ["--config", str(config)] if config else []
        argv += ["--concurrency", str(concurrency)] if concurrency else []
        argv += ["--quiet"] if quiet else []
        summary = run(parse_args(argv))
        generated = self.generation_records()
        ids = {s.id for s in self.samples()}
        summary["generator_errors"] = {i: r.get("reason") for i, r in generated.items()
                                       if i in ids and r.get("status") == "error" and not self.output_path(i).is_file()}
        write_json_atomic(self.judge_dir(profile, mode) / "summary.json", summary)
        return summary

    def verdicts(self, key: str) -> dict[str, dict]:
        """The latest record per sample of judge ``<profile>-<mode>``."""
        return VerdictLog(self.root / "judge" / key / "verdicts.jsonl").records()

    def judge_keys(self) -> list[str]:
        """``<profile>-<mode>`` of every judge that has results here."""
        folder = self.root / "judge"
        return sorted(p.name for p in folder.iterdir() if (p / "summary.json").is_file()) if folder.is_dir() else []

    def summary(self, key: str) -> dict:
        return json.loads((self.root / "judge" / key / "summary.json").read_text())





def profile_mode(profile: str, config=None) -> str:
    """The mode a profile judges in (the folder name's suffix), without building the judge."""

    profiles = load_profiles(config)
    if profile not in profiles:
        load_judge(profile, config=config)  # raises the judge package's own error, listing the profiles
    p = profiles[profile]
    if p.kind != "ensemble":
        return p.mode
    modes = {profile_mode(m, config) for m in p.members}
    return modes.pop() if len(modes) == 1 else "mixed"
