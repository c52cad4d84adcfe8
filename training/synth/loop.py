"""Dual-reference dataset synthesis (paper Sec. 3.1): pairs by theme -> LLM instruction + plan ->
optional target image -> optional judge filter -> manifest with a train/test split.

    python -m training.synth --config synth.json [--max-requests N] [--max-cost USD] [--concurrency N]

The config format is in ``training/synth/config.py``; the plan's schema is
``training/synth/plan_schema.json``. Everything lands in the config's ``out`` folder:
``manifest.jsonl`` (DESIGN contract 5; paths relative to it; each line with the source and licence
of its images), ``state.jsonl`` (append-only log of every pair's steps), ``targets/<id>.png`` and
``images/<content hash>.<ext>``: the kept samples' reference images, hard-linked (or copied) from
the pools, so the folder is self-contained and the pools may be moved or deleted afterwards.

Rerunning continues where the last run stopped: finished pairs (kept, rejected, failed) are
skipped, half-done ones resume from their last step (a plan is never asked twice, a target never
drawn twice), an unjudged sample is judged again. Pairs are keyed by task + the images' content,
so no pair appears twice, and no instruction is used twice within a task. The cost cap is hard:
each call's known or maximum price is reserved before it is sent; by default it covers every run
of the folder (``<out>/spend.json`` records what was spent), so a rerun continues the budget
(``--budget-scope run``: this run only). The request budget applies to one run. When a budget is
reached the run stops cleanly and keeps what is done.
Exit status: 0 finished (every count met, or the pools are used up), 3 stopped early (budget, an
endpoint that keeps failing; rerun to continue), 2 a bad config.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from judge.base import Judge
from judge.manifest import Sample, write_manifest
from judge.verdict import JudgeRequest, Unjudged

from ..config import at_least
from .config import ConfigError, SynthConfig, load_config
from .endpoints import BUDGET_SCOPES, Budget, BudgetExhausted, ChatClient, EndpointError, ImageClient, call_max_cost
from .instructions import InstructionRegistry, PlanRejected, request_plan
from .pairs import assign_splits, candidates_for, iter_pairs, sample_id, scan_pools, store_image
from .state import FINAL, PROGRESS, SynthState
from judge.config import ProfileError
from judge.registry import load_judge

log = logging.getLogger("training.synth")  # the same name when run with -m


def open_judge(profile_name: str) -> Judge:
    """The judge of a profile in the judge config (``judge/config.py``): openai, toy or ensemble."""

    try:
        return load_judge(profile_name)
    except ProfileError as e:
        raise ConfigError(f"judge filter: {e}") from None


class Synthesizer:
    def __init__(self, config: SynthConfig, judge: Judge | None = None, progress: bool = True):
        self.config, self.progress = config, progress
        for endpoint in filter(None, (config.llm, config.image)):
            try:
                endpoint.profile.api_key()  # fail now, naming the variable, not after the first pair
            except ValueError as e:
                raise ConfigError(str(e).replace("judge profile", "endpoint")) from None
        if judge is None and config.judge_profile:
            judge = open_judge(config.judge_profile)
        if judge is not None and config.image is None:
            raise ConfigError(f"{config.source}: the judge filter scores target images; configure 'image' too")
        self.judge = judge
        self.out = config.out
        self.state = SynthState(self.out / "state.jsonl")
        self.budget = Budget(config.max_requests, config.max_cost_usd, ledger=self.out / "spend.json",
                             scope=config.budget_scope)
        self.chat = ChatClient(config.llm, self.budget)
        self.images = ImageClient(config.image, self.budget) if config.image else None
        accounting = getattr(judge, "accounting", None)
        self._judge_base = accounting.snapshot() if accounting is not None else {}
        self.registry = InstructionRegistry()
        for record in self.state.records():
            if record.get("instruction"):
                self.registry.claim(record["task"], record["instruction"])

    # -- one pair --------------------------------------------------------------------------
    def process(self, task: str, image1, image2, key: str) -> str:
        """Take one pair as far as it goes; returns its stage afterwards (``unjudged`` if not final)."""
        base = {"task": task, "id": sample_id(task, key), "images": [str(image1.path), str(image2.path)],
                "shas": [image1.sha, image2.sha], "themes": [image1.theme, image2.theme]}
        try:
            return self._process(task, image1, image2, key, base)
        except EndpointError as e:
            self.state.append(key, "error", reason=str(e), **base)  # a note: the pair is taken up again
            raise

    def _process(self, task, image1, image2, key, base) -> str:
        from PIL import Image

        record = self.state.get(key) or {}
        sid = base["id"]
        try:
            with Image.open(image1.path) as a, Image.open(image2.path) as b:
                pil1, pil2 = a.convert("RGB"), b.convert("RGB")
        except OSError as e:  # a corrupt pool file: skip the pair, say which file
            reason = f"cannot read a pool image ({e}); fix or remove the file"
            log.warning("pair %s skipped: %s", sid, reason)
            self.state.append(key, "failed", reason=reason, **base)
            return "failed"
        if record.get("stage") not in PROGRESS:
            try:
                instruction, plan = request_plan(self.chat, task, pil1, pil2, self.registry, self.config.max_plan_attempts)
            except PlanRejected as e:
                log.warning("pair %s (%s, %s) skipped: %s", sid, image1.path.name, image2.path.name, e)
                self.state.append(key, "failed", reason=str(e), **base)
                return "failed"
            self.state.append(key, "planned", instruction=instruction, plan=plan, **base)
            record = self.state.get(key)
        target = record.get("target")
        if self.images is not None and not (target and (self.out / target).is_file()):
            prompt = self.config.image.prompt_template.format(
                instruction=record["instruction"], task=task,
                target_description=record["plan"].get("target_description", ""))
            image = self.images.generate(prompt, [pil1, pil2])
            target = f"targets/{sid}.png"
            path = self.out / target
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path.with_suffix(".part.png"))
            path.with_suffix(".part.png").replace(path)
            self.state.append(key, "target", target=target)
        if self.judge is None:
            self.state.append(key, "kept")
            return "kept"
        token = None
        if getattr(self.judge, "accounting", None) is not None:  # an HTTP judge: three paid questions
            token = self.budget.reserve(self._judge_max_cost(), requests=3)
        with Image.open(self.out / target) as t:
            output = t.convert("RGB")
        request = JudgeRequest(record["instruction"], pil1, pil2, output, sample_id=sid, task=task, plan=record["plan"])
        try:
            verdict = self.judge.judge(request)
        except Unjudged as e:
            log.info("pair %s unjudged (%s); it is judged again on the next run", sid, e.reason)
            self.state.append(key, "unjudged", reason=e.reason)
            return "unjudged"
        finally:
            self._count_judge()
            if token is not None:
                self.budget.settle(token)  # what it cost is counted by the judge's own accounting
        stage = "kept" if yes_count(verdict) >= self.config.judge_min_yes else "rejected"
        self.state.append(key, stage, verdict=verdict.to_dict())
        return stage

    def _judge_max_cost(self) -> float:
        """The most one judged sample may cost: three questions, each possibly re-asked."""
        profile = getattr(self.judge, "profile", None)
        if profile is None:
            return 0.0
        return 3 * (1 + profile.parse_retries) * call_max_cost(profile, 3000, images=3)

    def _count_judge(self) -> None:
        accounting = getattr(self.judge, "accounting", None)
        if accounting is not None:  # HTTP judges count their own requests and tokens
            now, base = accounting.snapshot(), self._judge_base
            used = {k: now.get(k, 0) - base.get(k, 0) for k in ("requests", "retries", "cost_usd")}
            self.budget.set_external("judge", used["requests"] + used["retries"], used["cost_usd"])

    # -- the run ---------------------------------------------------------------------------
    def _work(self, task: str, first, second, by_sha):
        """Pending pairs of ``task`` first (resumed), then new pairs in the seeded order."""
        for record in self.state.pending(task):
            images = [by_sha.get(sha) for sha in record.get("shas", [])]
            if len(images) == 2 and all(images):
                yield images[0], images[1], record["key"]
            else:
                log.warning("pair %s: its images are no longer in the pools; left as it is", record.get("id"))
        for image1, image2, key in iter_pairs(task, first, second, self.config.seed):
            if self.state.stage(key) is None:  # new, or only notes (an endpoint error) so far
                yield image1, image2, key

    def run(self) -> dict:
        cfg = self.config
        pools = scan_pools({theme: pool.path for theme, pool in cfg.pools.items()})
        by_sha = {im.sha: im for images in pools.values() for im in images}
        work, counts = {}, {}
        for task, count in cfg.tasks.items():
            if count > 0:
                work[task] = self._work(task, *candidates_for(task, cfg.themes[task], pools), by_sha)
                counts[task] = count
        kept = {t: self.state.count("kept", t) for t in counts}
        stalled = {t: 0 for t in counts}
        inflight: dict = {}
        stopped, consecutive_errors, tried = None, 0, 0
        bar = _tqdm(total=sum(counts.values()), initial=sum(min(kept[t], c) for t, c in counts.items()),
                    desc="samples kept", disable=not self.progress)

        def needed(task):
            busy = sum(1 for t, _ in inflight.values() if t == task)
            return counts[task] - kept[task] - busy - stalled[task]

        pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="synth")
        try:
            while True:
                while stopped is None and len(inflight) < cfg.concurrency:
                    open_tasks = [t for t in work if needed(t) > 0]
                    if not open_tasks:
                        break
                    task = min(open_tasks, key=lambda t: (kept[t] + stalled[t]) / counts[t])  # round robin by progress
                    item = next(work[task], None)
                    if item is None:
                        log.info("task %s: no more pairs in the pools (%d of %d kept)", task, kept[task], counts[task])
                        del work[task]
                        continue
                    inflight[pool.submit(self.process, task, *item)] = (task, item[2])
                if not inflight:
                    break
                done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for future in done:
                    task, key = inflight.pop(future)
                    tried += 1
                    spend = self.budget.snapshot()
                    bar.set_postfix_str(f"{tried} pairs tried, {spend['requests']} requests, "
                                        f"${spend['total_cost_usd']:.4f} spent", refresh=False)
                    try:
                        stage = future.result()
                    except BudgetExhausted as e:
                        stopped = stopped or str(e)
                        continue
                    except EndpointError as e:
                        stage, error = None, str(e)
                        log.warning("%s", e)
                    else:
                        error = "the judge could not judge" if stage == "unjudged" else None
                    # An endpoint (or judge) that keeps failing stops the run instead of paying
                    # for plans and targets that cannot be finished.
                    consecutive_errors = consecutive_errors + 1 if error else 0
                    if consecutive_errors >= cfg.max_consecutive_errors:
                        stopped = stopped or f"{consecutive_errors} failures in a row; last: {error}"
                    if stage is None and self.state.stage(key) in PROGRESS:
                        stage = "stalled"  # planned but unfinished: it holds its place until the next run
                    if stage is None:
                        continue
                    if stage == "kept":
                        kept[task] += 1
                        bar.update(1)
                    elif stage not in FINAL:
                        stalled[task] += 1
        except KeyboardInterrupt as e:
            # No new paid call from here on; the pairs in flight are abandoned (not waited for):
            # each is taken up from its last recorded step on the next run.
            stopped = "interrupted"
            self.budget.close("interrupted")
            e.synth_summary = lambda: self.summary
            raise
        finally:
            pool.shutdown(wait=stopped != "interrupted", cancel_futures=True)
            bar.close()
            manifest = self.write_manifest()
            self.summary = self._summary(counts, stopped, manifest)
        return self.summary

    def write_manifest(self) -> Path:
        path = self.out / "manifest.jsonl"
        samples = []
        kept = self.state.records("kept")
        by_task: dict[str, list[str]] = {}
        for record in kept:
            by_task.setdefault(record["task"], []).append(record["key"])
        splits = assign_splits(by_task, self.config.test_fraction)
        for record in kept:
            try:  # the pool images into <out>/images, so the manifest never points outside the folder
                stored = [store_image(Path(p), sha, self.out / "images") for p, sha in zip(record["images"], record["shas"])]
                sources = self._sources(record)
            except OSError as e:
                log.warning("sample %s left out of the manifest: %s; put the pool image back and rerun "
                            "(--manifest-only asks for nothing)", record["id"], e)
                continue
            images = [p.relative_to(self.out).as_posix() for p in stored]
            samples.append(Sample(record["id"], record["task"], images, record["instruction"], record.get("target"),
                                  record.get("plan"), splits[record["key"]], sources))
        write_manifest(path, samples)
        return path

    def _sources(self, record) -> dict:
        """The manifest's ``sources``: each image's pool's source and licence; the target's model."""
        pools = self.config.pools
        entries = []
        for k, image in enumerate(record["images"]):
            theme = (record.get("themes") or [None, None])[k]
            if theme not in pools:  # a pair recorded before themes were: the pool folder holding the image
                theme = next((t for t, pool in pools.items() if Path(image).is_relative_to(pool.path)), None)
            if theme is None:
                raise OSError(f"{image} is in none of the config's pools, so its source and licence are unknown")
            entries.append(pools[theme].provenance())
        sources = {"images": entries}
        if record.get("target") and self.config.image is not None:
            sources["target"] = self.config.image.provenance()
        return sources

    def _summary(self, counts, stopped, manifest) -> dict:
        per_task = {t: {s: self.state.count(s, t) for s in ("kept", "rejected", "failed")} | {
            "pending": len(self.state.pending(t)), "wanted": counts[t]} for t in counts}
        complete = all(v["kept"] >= v["wanted"] for v in per_task.values())
        return {"manifest": str(manifest), "tasks": per_task, "budget": self.budget.snapshot(),
                "spend": self.budget.spend_line(),
                "stopped": stopped, "complete": complete}

    def close(self) -> None:
        if self.judge is not None:
            self.judge.close()


def yes_count(verdict) -> int:
    """Questions answered yes (a probability-mode answer counts as yes from 0.5)."""
    return sum(score >= 0.5 for score in verdict.scores().values())


def run_synthesis(config, judge: Judge | None = None, progress: bool = True) -> dict:
    """Run (or resume) a synthesis; ``config`` is a path or a :class:`SynthConfig`. Returns a summary."""
    cfg = load_config(config) if isinstance(config, (str, os.PathLike)) else config
    synth = Synthesizer(cfg, judge, progress)
    try:
        summary = synth.run()
    except KeyboardInterrupt:
        raise  # the judge's calls in flight are abandoned with the rest, not waited for
    except BaseException:
        if judge is None:
            synth.close()
        raise
    if judge is None:  # close only what we opened
        synth.close()
    return summary


def _tqdm(**kwargs):
    from tqdm import tqdm

    return tqdm(**kwargs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="synthesis config (.json or .toml); see training/synth/config.py")
    p.add_argument("--max-requests", type=at_least(0), help="request budget for this run (overrides the config)")
    p.add_argument("--max-cost", type=at_least(0.0, float), help="USD cap (overrides the config): each call's known or maximum "
                   "price is reserved before it is sent, so the cap is never exceeded")
    p.add_argument("--budget-scope", choices=BUDGET_SCOPES, help="total (default): --max-cost covers every run of "
                   "this out folder (spend is recorded in <out>/spend.json), so a rerun continues the budget; "
                   "run: this run only")
    p.add_argument("--concurrency", type=at_least(1), help="pairs in flight at once (overrides the config)")
    p.add_argument("--manifest-only", action="store_true", help="rewrite manifest.jsonl from state.jsonl; no requests")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings and errors only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config)
        for name, value in (("max_requests", args.max_requests), ("max_cost_usd", args.max_cost),
                            ("concurrency", args.concurrency), ("budget_scope", args.budget_scope)):
            if value is not None:
                setattr(cfg, name, value)
        if args.manifest_only:
            print(_StateOnly(cfg).write_manifest())
            return 0
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():  # log lines above the progress bar, not through it
            summary = run_synthesis(cfg, progress=not args.quiet)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        summary = getattr(e, "synth_summary", lambda: None)()
        if summary is not None:
            kept = sum(t["kept"] for t in summary["tasks"].values())
            wanted = sum(t["wanted"] for t in summary["tasks"].values())
            pending = sum(t["pending"] for t in summary["tasks"].values())
            print(f"interrupted: {kept} of {wanted} samples kept, {pending} pairs half done (in-flight requests "
                  f"abandoned), {summary['spend']}; rerun the same command to continue", file=sys.stderr)
        else:
            print("interrupted; rerun the same command to continue", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Requests still in flight in worker threads are abandoned: exit now instead of joining them.
        os._exit(130)
    print(json.dumps(summary, indent=2))
    print(summary["spend"], file=sys.stderr)
    if summary["stopped"]:
        print(f"stopped early: {summary['stopped']}; rerun the same command to continue"
              + (" (with a higher --max-cost)" if summary["stopped"].startswith("cost budget") else ""), file=sys.stderr)
        return 3
    return 0


class _StateOnly(Synthesizer):
    """Enough of a Synthesizer to rewrite the manifest without keys or a judge."""

    def __init__(self, config: SynthConfig):
        self.config, self.out = config, config.out
        self.state = SynthState(self.out / "state.jsonl")
