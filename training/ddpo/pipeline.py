"""The main job, ``python -m training.ddpo``: toy world -> tiny base -> SFT -> DDPO -> evaluation.

    python -m training.ddpo                           # the toy job, into a new runs/ddpo-<date>-s0
    python -m training.ddpo --seed 1 --out runs/toy/s1
    python -m training.ddpo --out runs/toy/s1         # rerun: finished stages are reused, the rest resumes
    python -m training.ddpo --resume                  # continue the newest runs/ddpo-* folder
    python -m training.ddpo --config training/configs/kontext_ddpo.json --set lora.sft=/loras/sft.safetensors
    accelerate launch --num_processes 8 -m training.ddpo --config ...   # DDP: SFT and DDPO on every process

Without ``--config`` the job runs ``training/configs/toy_ddpo.json``. With one it runs the real thing:
Kontext files (``model.path`` or the single files), a judge profile (``judge.profile``), a manifest
(``data.manifest``), and an SFT LoRA (``lora.sft``) or an SFT config to run first (``sft_config``).

The run folder is ``--out``, else the config's ``run.out_dir`` (a rerun continues it), else a new
``runs/ddpo-<date>-s<seed>``: the toy config sets none, so every plain ``python -m training.ddpo`` is a
fresh run (``--resume`` continues the newest). Nothing is written there until the config, the files
and the judge have passed their checks, and a given SFT LoRA its check against the base (the toy
base: right after it is built, before the SFT LoRA is copied in and before any rollout).

The run folder:
    config.json                the resolved config (a rerun with the same --out continues with it)
    base.json                  model.path "toy": the toy base folder this run uses (kept on reruns)
    world/                     the DualShapes toy world (when ``world`` is set and data.manifest is not)
    sft/                       the SFT run (training.sft.trainer's folder), whose LoRA becomes dualref_sft.safetensors
    dualref_sft.safetensors    the frozen SFT LoRA;   dualref_ddpo.safetensors   the DDPO LoRA
    metrics.jsonl, checkpoints/     DDPO's per-iteration metrics and checkpoints
    eval/base|sft|sft_ddpo/    benchmark run folders (outputs, verdicts), ODE sampling on the test split
    summary.json / .md         Table 2: {"base"|"sft"|"sft_ddpo": {<task>: mean reward, ..., "mean": ...}}
    table2.json                the full comparison tables (per question, counts, the judge)
    report.html, reward_curve.png, grid.png, stages.json
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

from ..config import ConfigError, load_config
from ..files import atomic_path
from .config import DDPOConfig, ddpo_config_from_dict, load_ddpo_config
from ..toy.world import generate_world
from judge.registry import load_judge
from ..toy.base import resolve_model_path
from ..interrupts import sigterm_interrupts
from judge.manifest import ManifestError

log = logging.getLogger(__name__)

TOY_CONFIG = Path(__file__).parents[1] / "configs" / "toy_ddpo.json"
SFT_LORA = "dualref_sft.safetensors"
RUNS = Path("runs")


class Stages:
    """Wall time of each stage of this invocation (``stages.json``); reused stages say so."""

    def __init__(self, out: Path, enabled: bool):
        self.path, self.enabled, self.times = out / "stages.json", enabled, {}
        self.start = time.perf_counter()
        try:  # an earlier invocation's times, so a reused stage still says what it cost
            self.earlier = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.earlier = {}

    def run(self, name: str, done: bool, fn, *args, **kwargs):
        if done:
            self._record(name, "reused", 0.0)
            before = self.earlier.get(name, {})
            if isinstance(before, dict) and "seconds" in before:
                self.times[name]["earlier_seconds"] = before.get("earlier_seconds", before["seconds"])
                self._record(name, "reused", 0.0, keep=True)
            print(f"[{name}] done earlier: reused")
            return None
        print(f"[{name}] ...", flush=True)
        begin = time.perf_counter()
        result = fn(*args, **kwargs)
        self._record(name, "ran", time.perf_counter() - begin)
        print(f"[{name}] {time.perf_counter() - begin:.0f} s", flush=True)
        return result

    def _record(self, name, status, seconds, keep: bool = False):
        if not keep:
            self.times[name] = {"status": status, "seconds": round(seconds, 1)}
        if self.enabled:
            self.times["total_seconds"] = round(time.perf_counter() - self.start, 1)
            self.path.write_text(json.dumps(self.times, indent=1))


def resolve_config(args) -> tuple[DDPOConfig, Path]:
    """The run's config and folder: an existing run's config.json, else --config (default the toy job);
    then --set / --seed on top. The folder: --out, else the config's ``run.out_dir``, else (``--resume``)
    the newest runs/ddpo-*, else a new runs/ddpo-<date>-s<seed>."""
    overrides = list(args.overrides) + ([f"run.seed={args.seed}"] if args.seed is not None else [])
    requested = load_ddpo_config(args.config or TOY_CONFIG, overrides)
    out = Path(args.out) if args.out else Path(requested.run.out_dir) if requested.run.out_dir else None
    if out is None and args.resume:
        found = sorted((p for p in RUNS.glob("ddpo-*") if (p / "config.json").is_file()), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError("--resume: no run folder runs/ddpo-* to continue; pass --out DIR")
        out = found[-1]
    stored = out / "config.json" if out is not None else None
    if stored is not None and stored.is_file() and not args.config:
        cfg = load_ddpo_config(stored, overrides)
    else:
        if args.resume and (stored is None or not stored.is_file()):
            raise ConfigError(f"--resume: {out} holds no run (no config.json); leave out --resume to start it")
        cfg = requested
    if out is None:
        out = RUNS / f"ddpo-{datetime.now():%Y%m%d-%H%M%S}-s{cfg.run.seed}"
    cfg.run.out_dir = str(out)
    if args.quiet:
        cfg.run.progress = False
    return cfg, out


def make_world(cfg: DDPOConfig, out: Path) -> Path:

    generate_world(out / "world", progress=cfg.run.progress, **cfg.world)
    return out / "world" / "manifest.jsonl"


def sft_run_config(cfg: DDPOConfig, out: Path):
    """The SFT config's run into ``<out>/sft`` on this job's model, data and seed, validated."""
    sft = load_config(cfg.sft_config)
    sft.model = cfg.model
    sft.data.manifest, sft.data.cache_dir = cfg.data.manifest, cfg.data.cache_dir
    sft.train.seed, sft.run.out_dir, sft.run.progress = cfg.run.seed, str(out / "sft"), cfg.run.progress
    return sft.validate()


def run_sft(cfg: DDPOConfig, out: Path) -> Path:
    """The SFT run (:func:`sft_run_config`); its LoRA -> dualref_sft."""
    # torch-heavy stages load when they run: --help and a bad config answer at once
    from ..sft.trainer import train

    result = train(sft_run_config(cfg, out), resume="auto")
    if result.lora_path is not None:  # the main process; never half a file
        with atomic_path(out / SFT_LORA) as tmp:
            shutil.copyfile(result.lora_path, tmp)
    return out / SFT_LORA


def ddpo_done(cfg: DDPOConfig, out: Path) -> bool:
    # torch-heavy stages load when they run: --help and a bad config answer at once
    from ..lora_io import load_lora
    from .loop import DDPO_LORA

    path = out / DDPO_LORA
    if not path.is_file():
        return False
    meta = load_lora(path)[1]
    return meta is not None and meta.train.get("steps") == cfg.ddpo.iterations


def check_inputs(cfg: DDPOConfig) -> None:
    """The files the config names exist and the judge profile loads (the manifest's own lines are
    checked when it is read)."""
    if cfg.data.manifest and not Path(cfg.data.manifest).is_file():
        raise ConfigError(f"data.manifest: {cfg.data.manifest} does not exist; pass the JSONL manifest of the "
                          "training tuples (DESIGN contract 5), or leave it empty and set `world` for the toy world")
    if cfg.lora.sft and not Path(cfg.lora.sft).is_file():
        raise ConfigError(f"lora.sft: {cfg.lora.sft} does not exist; pass an SFT LoRA from python -m training.sft, "
                          "or leave lora.sft unset and give sft_config to run SFT first")

    overrides = {"mode": cfg.judge.mode} if cfg.judge.mode else {}
    load_judge(cfg.judge.profile, config=cfg.judge.config, **overrides).close()  # unknown profile, unset key
    if not cfg.lora.sft and cfg.sft_config and not Path(cfg.sft_config).is_file():
        raise ConfigError(f"sft_config: {cfg.sft_config} does not exist; pass an SFT config file "
                          "(e.g. training/configs/toy_sft.json)")


def check_config(cfg: DDPOConfig, out: Path) -> None:
    """Every check that needs no model: the files and the judge (:func:`check_inputs`), the DDPO config
    as the stages will see it, the manifest's lines, and the SFT config; before the run folder is touched."""
    check_inputs(cfg)
    planned = copy.deepcopy(cfg)
    if not planned.data.manifest:
        if not planned.world:
            raise ConfigError("data.manifest is required (or `world` to generate the toy world)")
        planned.data.manifest = str(out / "world" / "manifest.jsonl")  # what the world stage will write
    planned.validate(need_sft=False)
    if cfg.data.manifest:  # its lines and images (the toy world's are checked when DDPO reads them)
        # torch-heavy stages load when they run: --help and a bad config answer at once
        from .loop import read_records

        read_records(cfg)
    if not cfg.lora.sft:
        if not cfg.sft_config:
            raise ConfigError("lora.sft (an SFT LoRA file) or sft_config (an SFT config to run first) is required")
        sft_run_config(planned, out)


def checked_model(cfg: DDPOConfig, accelerator, shown):
    """The model DDPO will train on, with the SFT LoRA ``cfg.lora.sft`` checked against its base
    (:func:`training.ddpo.state.check_sft_lora`, named ``shown``). The transformer loads here, once."""
    # torch-heavy stages load when they run: --help and a bad config answer at once
    from ..models import load_model
    from .state import check_sft_lora

    bundle = load_model(cfg.model, device=accelerator.device, precision=cfg.run.precision)
    check_sft_lora(cfg.lora.sft, bundle.base_fingerprint(), cfg.run.layout, shown)
    return bundle


def _recorded_base(record: Path) -> str | None:
    try:
        path = json.loads(record.read_text())["path"]
        return path if json.loads((Path(path) / "dualref.json").read_text()).get("complete") else None
    except (OSError, ValueError, KeyError):
        return None


def _build_toy_base(cfg: DDPOConfig, record: Path) -> Path:

    path = resolve_model_path("toy", cfg.model.toy_cache_dir, progress=cfg.run.progress, **(cfg.toy_recipe or {}))
    record.write_text(json.dumps({"path": str(path)}))
    return path


def run_pipeline(cfg: DDPOConfig, out: Path, accelerator=None) -> dict | None:
    """Every stage in order, each skipped when its product is already in ``out``. Returns the summary."""
    # torch-heavy stages load when they run: --help and a bad config answer at once
    from ..runtime import make_accelerator
    from .loop import DDPO_LORA, train_ddpo

    check_config(cfg, out)  # before any stage: a typo must not cost a base build or an SFT run
    accelerator = accelerator or make_accelerator(timeout_min=cfg.run.process_group_timeout_min)
    main = accelerator.is_main_process
    # The user's SFT LoRA (the run folder keeps a copy, but errors name the user's file).
    user_sft = cfg.lora.sft if cfg.lora.sft and Path(cfg.lora.sft).resolve() != (out / SFT_LORA).resolve() else None
    to_train = not ddpo_done(cfg, out)
    bundle = None
    if user_sft and to_train and cfg.model.path != "toy":  # a LoRA of another base fails before anything is written
        bundle = checked_model(cfg, accelerator, user_sft)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out, main)
    if main:
        stored = out / "config.json"
        if stored.is_file() and json.loads(stored.read_text()) != cfg.to_dict():
            log.warning("the config differs from the one this run started with (%s); continuing with the new one",
                        stored)
        stored.write_text(json.dumps(cfg.to_dict(), indent=1))
    if not cfg.data.manifest:
        manifest = out / "world" / "manifest.jsonl"
        if main:
            stages.run("world", False, make_world, cfg, out)
        accelerator.wait_for_everyone()
        cfg.data.manifest = str(manifest)
    if cfg.model.path == "toy":
        # The run keeps the base it started with (base.json): the toy recipe may change while it runs or
        # before a rerun, and its SFT and DDPO LoRAs belong to that base, not to the new default.
        record = out / "base.json"
        if main:
            known = _recorded_base(record)
            stages.run("base", known is not None, _build_toy_base, cfg, record)
        accelerator.wait_for_everyone()
        cfg.model.path = json.loads(record.read_text())["path"]
        if user_sft and to_train:  # the toy base is known only now: still before the copy and any rollout
            bundle = checked_model(cfg, accelerator, user_sft)
    if user_sft:
        if main and not (out / SFT_LORA).is_file():
            shutil.copyfile(cfg.lora.sft, out / SFT_LORA)  # the run folder holds both LoRAs it used
        accelerator.wait_for_everyone()
    elif not cfg.lora.sft:
        stages.run("sft", (out / SFT_LORA).is_file(), run_sft, cfg, out)
        accelerator.wait_for_everyone()
    cfg.lora.sft = str(out / SFT_LORA)
    stages.run("ddpo", not to_train, train_ddpo, cfg, accelerator=accelerator, bundle=bundle,
               sft_shown=user_sft)
    bundle = None  # evaluation loads its own model: not two transformers at once
    # torch-heavy stages load when they run: --help and a bad config answer at once
    from .report import evaluate_and_report

    # every process samples its share; the main one judges and writes the tables (the others get None)
    summary = stages.run("eval", False, evaluate_and_report, cfg, out, out / SFT_LORA, out / DDPO_LORA,
                         accelerator.device, accelerator)
    accelerator.wait_for_everyone()
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training.ddpo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--config", help="JSON, YAML or TOML (see training/ddpo/config.py); default: the toy job "
                   f"({TOY_CONFIG.relative_to(Path(__file__).parents[2])})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set ddpo.iterations=50 (repeatable; values are JSON)")
    p.add_argument("--out", help="run folder (default: the config's run.out_dir, else a new runs/ddpo-<date>-s<seed>); "
                   "an existing one is continued")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (default: the newest runs/ddpo-*)")
    p.add_argument("--seed", type=int, help="run.seed (SFT and DDPO; the toy world and base stay fixed)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:

    with sigterm_interrupts():  # a scheduler's or ``kill``'s stop takes the Ctrl-C path: checkpoint, exit 130
        return _main(argv)


def _main(argv=None) -> int:

    # torch-heavy stages load when they run: --help and a bad config answer at once
    from ..model_files import ModelFileError

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = args.out
    try:
        cfg, out = resolve_config(args)
        print(f"run folder: {out}")
        summary = run_pipeline(cfg, out)
    except (ConfigError, ManifestError, ModelFileError, FileNotFoundError, ValueError) as e:
        log.debug("failed", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; continue with: python -m training.ddpo --out {out}", file=sys.stderr)
        return 130
    if summary is not None:
        print(f"results in {out}: summary.json, summary.md, report.html, reward_curve.png, grid.png, "
              "dualref_sft.safetensors, dualref_ddpo.safetensors")
    return 0


__all__ = ["ddpo_config_from_dict", "main", "run_pipeline"]
