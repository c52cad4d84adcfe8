"""``python -m training.bench``: the paper's Table 2 (five dual-reference tasks, judged) and Table 1
(single-reference edits, base vs fine-tuned, 0-10 judge). With no arguments it benchmarks the toy
base on the DualShapes toy world's test split with the toy judge (building both on first use).

    python -m training.bench                                          # Table 2: toy base, toy world, toy judge
    python -m training.bench --lora runs/sft/lora.safetensors [--lora2 runs/ddpo/lora.safetensors]
    python -m training.bench --manifest data/bench.jsonl --model /models/FLUX.1-Kontext-dev \\
        --lora sft.safetensors --judge gpt-5 --judge seed-vlm --out runs/bench/ours
    python -m training.bench --generator comfyui --server http://gpu1:8188 --server http://gpu2:8188 \\
        --manifest data/bench.jsonl --lora dualref_sft.safetensors --judge gpt-5
    python -m training.bench --single --lora runs/sft/lora.safetensors          # Table 1
    python -m training.bench --compare runs/bench/toy runs/bench/toy+lora --out runs/bench/compare

A run folder (``--out``, default ``runs/bench/<label>``) holds the outputs (``outputs/<id>.png``),
the verdicts per judge (``judge/<profile>-<mode>/verdicts.jsonl``), the tables per judge
(``table2.<profile>-<mode>.md``/``.json``; judging again with another judge adds its own beside the
earlier ones), ``table2.md``/``.json`` with every judge's tables, and ``report.html`` (the same
judges' tables and verdicts); its layout is described in training/bench/run_folder.py. Rerunning the same command
resumes: existing outputs are reused, judged samples are not judged again, and samples that failed
(generator error, unjudged) are retried. Failures are reported and counted, never scored 0.

Without ``--judge`` the judge is the toy judge for toy-world manifests (every sample has a toy-world
plan), else the configured default profile (judge/config.py); the choice is printed.
Exit status: 0 every sample has an output and a verdict from every judge (or the shortfall is within
``--allow-missing``), 1 some are missing (the tables are written; the first reasons are printed),
2 a bad request (manifest, model, LoRA, judge profile), 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from comfy_queue.comfy_errors import ComfyError
from judge.config import PROFILE_ENV, default_profile_name, load_profiles
from judge.manifest import SINGLE_TASKS, TASKS
from judge.toy import PLAN_VERSION

from ..config import at_least
from ..files import cache_dir_for
from ..toy.world import generate_world
from .generators import NO_LORA, ComfyGenerator, HeadlessGenerator, generate_missing
from .report import compare_tables, run_tables, table_text, write_report, write_tables
from .run_folder import BenchError, RunDir, profile_mode, select_samples

log = logging.getLogger("training.bench")

DEFAULT_WORLD = Path("runs/toy/world")
DEFAULT_RUNS = Path("runs/bench")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--manifest", type=Path, help=f"benchmark manifest (default: the toy world at {DEFAULT_WORLD}, "
                   "generated if absent)")
    p.add_argument("--split", default="test", help="split to benchmark (default: test)")
    p.add_argument("--tasks", nargs="+", help="tasks to include (default: the five dual tasks; --single: single_edit)")
    p.add_argument("--limit-per-task", type=at_least(1), help="at most N samples of each task (the first N in the manifest)")
    p.add_argument("--generator", choices=("headless", "comfyui"), default="headless")
    p.add_argument("--server", action="append", default=[], help="comfyui: a ComfyUI URL; repeat to share the work")
    p.add_argument("--workflow-dir", type=Path, help="comfyui: folder of <task>.json API workflows "
                   "(default: the pack's comfy_queue/api)")
    p.add_argument("--timeout", type=at_least(0.001, float), help="comfyui: seconds to wait for one job")
    p.add_argument("--model", help="headless: a Kontext diffusers folder or 'toy' (default); "
                   "comfyui: the UNETLoader file name (default: the workflow's)")
    p.add_argument("--lora", help="the SFT LoRA (headless: a .safetensors path; comfyui: a file name in the server's "
                   "models/loras, 'none' for the base model)")
    p.add_argument("--lora2", help="a DDPO LoRA stacked on --lora")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--lora2-scale", type=float, default=1.0)
    p.add_argument("--layout", choices=("diagonal", "offset", "index", "uxo"),
                   help="reference layout (default: diagonal; comfyui: the workflow's)")
    p.add_argument("--steps", type=at_least(1), help="sampling steps (default: the model's / the workflow's)")
    p.add_argument("--guidance", type=float, help="guidance (default: the model's / the workflow's)")
    p.add_argument("--seed", type=int, default=0, help="base seed; sample i of the selection gets seed*1000003+i")
    p.add_argument("--batch-size", type=at_least(1), default=16, help="headless sampling batch")
    p.add_argument("--judge", action="append", default=[], metavar="PROFILE",
                   help="judge profile; repeat for several judges side by side (default: the configured default "
                   "profile; the toy judge for toy-world manifests)")
    p.add_argument("--allow-missing", type=fraction, default=0.0, metavar="FRACTION",
                   help="exit 0 even when up to this fraction of the samples has no output or no verdict "
                   "(default 0: any such sample makes the run exit 1)")
    p.add_argument("--judge-config", type=Path, help="judges config file (default: see judge/config.py)")
    p.add_argument("--judge-mode", choices=("binary", "probability"), help="override the profiles' mode")
    p.add_argument("--concurrency", type=at_least(1), help="override the judge profiles' concurrency")
    p.add_argument("--out", type=Path, help="run folder (default: runs/bench/<label>)")
    p.add_argument("--label", help="the model's name in tables (default: from model and LoRAs)")
    p.add_argument("--single", action="store_true", help="Table 1: single-reference edits, base vs --lora, 0-10 judge")
    p.add_argument("--compare", nargs="+", type=Path, metavar="RUN", help="tabulate finished run folders side by side")
    p.add_argument("--cache-dir", type=Path, help="latent/text cache (default: <manifest folder>/.cache)")
    p.add_argument("--toy-cache-dir", type=Path, help="where the toy base is built/kept (default: $DUALREF_CACHE)")
    p.add_argument("--device", help="headless: torch device (default: cuda where available, else cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16"),
                   help="headless: the transformer's precision (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--report-rows", type=at_least(0), default=64, help="samples per task shown in report.html (default 64)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "run"


def default_manifest() -> Path:
    """The toy world's manifest: reused where it exists (e.g. generated for SFT), else generated."""

    manifest = DEFAULT_WORLD / "manifest.jsonl"
    if not manifest.is_file():
        print(f"generating the toy world in {DEFAULT_WORLD} (test split) ...", file=sys.stderr)
        generate_world(DEFAULT_WORLD, seed=0, train=0, test=64)
    return manifest


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in [0, 1] (e.g. 0.05 for 5%%)")
    return value


def is_toy_world(selected) -> bool:
    """Every sample carries a DualShapes plan of the version the toy judge reads (a synthesized
    manifest's LLM plans do not)."""
    return all(isinstance(s.sample.plan, dict) and s.sample.plan.get("version") == PLAN_VERSION for s in selected)


def default_judges(selected, config) -> list[str]:
    """No ``--judge``: the toy judge for toy-world samples, else the configured default profile; the
    choice is printed, never made silently."""
    if is_toy_world(selected):
        print("judge: toy (every sample has a toy-world plan); pass --judge PROFILE for another")
        return ["toy"]
    name = default_profile_name(load_profiles(config))
    if name == "toy":
        raise BenchError("these samples are not toy-world samples (no toy-world plans), so the toy judge cannot "
                         "score them, and no other judge profile is configured; pass --judge PROFILE (an "
                         "OpenAI-compatible VLM profile, see judge/judges.example.json) or --judge-config FILE")
    why = f"${PROFILE_ENV}" if os.environ.get(PROFILE_ENV) else "the configured default profile"
    print(f"judge: {name} ({why}); pass --judge PROFILE for another")
    return [name]


def unscored(run: RunDir, summaries: dict, allow: float) -> list[str]:
    """Why the run is not a full result: per judge, the samples left without an output or a verdict
    when they are more than ``allow`` of the whole; empty when the run may exit 0."""
    problems = []
    for key, summary in summaries.items():
        total = summary.get("n_samples") or 0
        o = summary.get("overall", {})
        short = total - o.get("n_judged", 0)
        if short == 0 or (total and short / total <= allow):
            continue
        errors = summary.get("generator_errors") or {}
        ids = [s.id for s in run.samples()]
        records = run.verdicts(key)
        reasons = [f"{i}: " + (f"{records[i].get('status')}: {errors.get(i) or records[i].get('reason')}"
                               if i in records else "not judged (interrupted?)")
                   for i in ids if records.get(i, {}).get("status") != "judged"]
        counts = ", ".join(f"{o.get('n_' + s, 0)} {label}" for s, label in
                           (("missing", "without output"), ("unjudged", "unjudged"), ("bad_input", "bad input")))
        problems.append(f"[{run.label()}] judge {key}: {short} of {total} samples have no verdict ({counts}); "
                        f"--allow-missing is {allow:g}. First reasons:\n"
                        + "\n".join(f"    {r}" for r in reasons[:5]))
    return problems


def report_unscored(problems: list[str]) -> int:
    if not problems:
        return 0
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    print("the results above are incomplete: fix the cause and rerun the same command (finished samples are kept), "
          "or pass --allow-missing FRACTION to accept them", file=sys.stderr)
    return 1


def _loras(args) -> list[tuple[str, float]]:
    if args.lora2 and not args.lora:
        raise BenchError("--lora2 (the DDPO LoRA) is stacked on an SFT LoRA: pass --lora too")
    return [(p, s) for p, s in ((args.lora, args.lora_scale), (args.lora2, args.lora2_scale)) if p]


def make_generator(args, loras, bundle=None):
    progress = not args.quiet
    if args.generator == "comfyui":
        # file names in the servers' models/loras ("none": DualLoRAApply taken out)
        sft, ddpo = (Path(loras[k][0]).name if len(loras) > k else None for k in (0, 1))
        return ComfyGenerator(args.server, args.workflow_dir, args.model, sft, ddpo, args.layout, args.steps,
                              args.guidance, args.seed, args.timeout, progress)
    if args.server or args.workflow_dir:
        raise BenchError("--server / --workflow-dir are for --generator comfyui")
    loras = [(p, s) for p, s in loras if p != NO_LORA]
    if bundle is None:
        bundle = load_headless_model(args)
    return HeadlessGenerator(args.model or "toy", loras, args.layout or "diagonal", args.steps, args.guidance,
                             args.seed, args.batch_size, args.cache_dir,
                             bundle=bundle, progress=progress)


def load_headless_model(args):
    """``--model`` on ``--device`` in ``--precision`` (CUDA + bf16 where available, else CPU + fp32)."""
    import torch  # heavy imports on use: --help and --compare stay light

    # torch-heavy: loaded for a headless run only; --help and --compare stay light
    from ..config import ModelConfig
    from ..models import load_model
    from ..toy.base import resolve_model_path

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if torch.device(device).type == "cuda" else "fp32")
    path = resolve_model_path(args.model or "toy", args.toy_cache_dir, progress=not args.quiet)
    return load_model(ModelConfig(path=str(path)), device=device, precision=precision)


@dataclass(frozen=True)
class Judging:
    """How a run's outputs are judged: the profiles' config file, a mode over the profiles' own, and
    a concurrency over theirs."""

    config: Path | None = None
    mode: str | None = None
    concurrency: int | None = None
    quiet: bool = False  # no progress bar

    @classmethod
    def from_args(cls, args) -> "Judging":
        return cls(args.judge_config, args.judge_mode, args.concurrency, args.quiet)


def judge_modes(judging: Judging, judges, mode=None) -> list[tuple[str, str]]:
    """``(profile, mode)`` per judge, checked before anything is generated (a typo fails at once)."""
    checked = [(profile, profile_mode(profile, judging.config)) for profile in judges]
    return [(profile, mode or judging.mode or own) for profile, own in checked]


def bench_run(run: RunDir, selected, manifest: Path, generator, label: str, judges, judging: Judging, split: str,
              mode=None, accelerator=None) -> dict:
    """Generate what is missing, judge it with every ``(profile, mode)``, return ``{<profile>-<mode>: summary}``.

    ``accelerator`` with several processes (every one calls this): the main process prepares the folder,
    each generates its share of the batches (:func:`generate_missing`), the main one judges them all
    (the judge profile's rate is the limit there, not the processes) and the others return ``{}``."""
    main = accelerator is None or accelerator.is_main_process
    sharded = accelerator is not None and accelerator.num_processes > 1
    args = (selected, manifest, generator.identity(), label, {"generator": generator.describe(), "split": split})
    if main:
        run.prepare(*args)
    if sharded:
        accelerator.wait_for_everyone()
        if not main:
            run.prepare(*args, write=False)
    counts = generate_missing(run, selected, generator, accelerator if sharded else None)
    if not main:
        return {}
    shares = f", per process {counts['per_rank']}" if sharded else ""
    print(f"[{label}] outputs: {counts['generated']} generated, {counts['reused']} reused, "
          f"{counts['errors']} generator errors ({counts['seconds']:.1f} s{shares})")
    summaries = {}
    for profile, judge_mode in judges:
        summary = run.judge(profile, judge_mode, mode or judging.mode, judging.config, judging.concurrency,
                            judging.quiet)
        o = summary["overall"]
        print(f"[{label}] judge {profile}-{judge_mode}: {o['n_judged']} judged, {o['n_unjudged']} unjudged, "
              f"{o['n_missing']} without output, {o['n_bad_input']} bad input ({summary.get('wall_s', 0):.1f} s)")
        summaries[f"{profile}-{judge_mode}"] = summary
    return summaries


def table2(args) -> int:
    manifest = args.manifest or default_manifest()
    args.cache_dir = cache_dir_for(manifest, args.cache_dir)  # shared with SFT/DDPO on the same data
    tasks = args.tasks or list(TASKS)
    selected = select_samples(manifest, args.split, tasks, args.limit_per_task, args.seed)
    judges = judge_modes(Judging.from_args(args), args.judge or default_judges(selected, args.judge_config))
    generator = make_generator(args, _loras(args))
    label = args.label or generator.label
    run = RunDir(args.out or DEFAULT_RUNS / slug(label))
    print(f"benchmark {label}: {len(selected)} {args.split} samples of {manifest} "
          f"({len({s.sample.task for s in selected})} tasks), generator {generator.kind}, "
          f"judges {', '.join(p for p, _ in judges)}")
    summaries = bench_run(run, selected, manifest, generator, label, judges, Judging.from_args(args), args.split)
    md, js, report = write_run_results(run, label, args.report_rows, first=list(summaries))
    print()
    print(table_text(run_tables(label, summaries)))
    print(f"results: {md}, {js}, {report}")
    return report_unscored(unscored(run, summaries, args.allow_missing))


def write_run_results(run: RunDir, label: str, report_rows: int | None, first=()) -> tuple[Path, Path, Path]:
    """The run folder's tables and report, from every judge that has results in it: one
    ``table2.<profile>-<mode>.md/.json`` per judge (re-judging with another judge writes its tables
    beside the earlier ones), ``table2.md/.json`` with all of them, and report.html showing those
    judges' tables and verdicts, no more and no fewer. ``first``: this run's judges, listed first."""
    keys = [k for k in first if k in run.judge_keys()] + [k for k in run.judge_keys() if k not in first]
    summaries = {key: run.summary(key) for key in keys}
    for key in keys:
        write_tables(run.root, f"table2.{key}", run_tables(label, {key: summaries[key]}),
                     {"label": label, "judges": {key: summaries[key]}})
    tables = run_tables(label, summaries)
    md, js = write_tables(run.root, "table2", tables, {"label": label, "judges": summaries})
    report = write_report(run.root / "report.html", f"DualRef benchmark - {label}", [run], tables, report_rows,
                          judge_keys=keys)
    return md, js, report


def table1(args) -> int:
    if args.generator != "headless":
        raise BenchError("--single runs headless: the ComfyUI task workflows take two references")
    manifest = args.manifest or default_manifest()
    args.cache_dir = cache_dir_for(manifest, args.cache_dir)
    tasks = args.tasks or list(SINGLE_TASKS)
    selected = select_samples(manifest, args.split, tasks, args.limit_per_task, args.seed)
    judges = judge_modes(Judging.from_args(args), args.judge or default_judges(selected, args.judge_config),
                         mode="score")
    base = make_generator(args, [])
    model = args.label or base.label
    out = Path(args.out or DEFAULT_RUNS / f"{slug(model)}-table1")
    variants = [("base", f"Native {model}", base)]
    loras = _loras(args)
    if loras:
        tuned = make_generator(args, loras, bundle=base.bundle)
        variants.append(("finetuned", f"Dual-image fine-tuned ({'+'.join(Path(p).stem for p, _ in loras)})", tuned))
    runs = []
    for name, label, generator in variants:
        selected = select_samples(manifest, args.split, tasks, args.limit_per_task, args.seed)
        if name == "base":
            print(f"Table 1: {len(selected)} single-reference {args.split} samples of {manifest}, judges "
                  f"{', '.join(p for p, _ in judges)} (0-10 score mode)")
        run = RunDir(out / name)
        runs.append((label, bench_run(run, selected, manifest, generator, label, judges, Judging.from_args(args), args.split,
                                          mode="score"), run))
    tables = compare_tables([(label, summaries) for label, summaries, _ in runs])
    md, js = write_tables(out, "table1", tables, {"runs": {label: str(run.root) for label, _, run in runs}})
    report = write_report(out / "report.html", f"DualRef Table 1 - {model}", [r for *_, r in runs], tables,
                          args.report_rows)
    print()
    print(table_text(tables))
    if not loras:
        print("(pass --lora to add the fine-tuned row)")
    print(f"results: {md}, {js}, {report}")
    return report_unscored([p for _, summaries, run in runs for p in unscored(run, summaries, args.allow_missing)])


def compare(args) -> int:
    runs = [RunDir(d) for d in args.compare]
    for run in runs:
        if not run.judge_keys():
            raise BenchError(f"{run.root} has no judged results; run python -m training.bench --out {run.root} first")
    tables = compare_tables([(run.label(), {k: run.summary(k) for k in run.judge_keys()}) for run in runs])
    out = Path(args.out or DEFAULT_RUNS / "compare")
    out.mkdir(parents=True, exist_ok=True)
    md, js = write_tables(out, "compare", tables, {"runs": {run.label(): str(run.root) for run in runs}})
    report = write_report(out / "report.html", "DualRef benchmark comparison", runs, tables, args.report_rows)
    print(table_text(tables))
    print(f"results: {md}, {js}, {report}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    try:
        if args.compare:
            return compare(args)
        return table1(args) if args.single else table2(args)
    except (ValueError, ComfyError) as e:  # BenchError, ManifestError, ProfileError, LoRA/model file errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume (outputs and verdicts so far are kept)", file=sys.stderr)
        return 130
