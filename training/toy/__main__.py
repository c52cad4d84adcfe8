"""``python -m training.toy``: the DualShapes world, the cached tiny base and its Table 2 (three layouts).

    python -m training.toy                     # world + toy base (built once) + the base Table
    python -m training.toy --sft-table         # ... + one SFT run per layout, base vs SFT per layout
    python -m training.toy --sft-table --markdown docs/toy_tables.md

Steps: (1) generate the world the main job uses (seed 0, 256 train / 64 test per dual task, 64 px;
see training/configs/toy_ddpo.json "world") under ``<out>/world``; (2) build or reuse the toy base
(training/toy/base.py, cached under ``$DUALREF_CACHE`` or ~/.cache/dualref); (3) judge the base on
its own held-out single_edit split, then on the five dual tasks' test split with the two references
fed naively under each layout (the base never saw two references), ToyJudge, deterministic ODE
sampling; (4) with ``--sft-table``: one LoRA SFT run per layout (training/configs/toy_sft.json with
``train.layout`` set to it) and the SFT model judged under the layout it was trained with.

Everything is cached: the world and base by their settings, each SFT run by its config
(``<out>/sft-<layout>/``), each evaluation by what decides it (``<out>/evals/``), so a rerun prints
the same tables in seconds. Numbers are mean rewards, (fidelity + consistency + realism) / 3.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from judge.manifest import TASKS
from ..config import load_config
from ..files import file_digest
from .tables import evaluate, gains_markdown, paired_gains, questions_markdown, table2_markdown, wins
from .world import generate_world

DEFAULT_LAYOUTS = ("offset", "index", "diagonal")
DEFAULT_SFT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy_sft.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training.toy", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--out", type=Path, default=Path("runs/toy"),
                   help="folder for world/, evals/ and sft-<layout>/ (default: runs/toy)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default 0, the main job's)")
    p.add_argument("--train", type=int, default=256, help="training samples per dual task (default 256)")
    p.add_argument("--test", type=int, default=64, help="test samples per dual task (default 64)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--layouts", nargs="+", default=list(DEFAULT_LAYOUTS),
                   choices=("offset", "index", "diagonal", "uxo"), help="layouts to evaluate (default: %(default)s)")
    p.add_argument("--judge-mode", default="binary", choices=("binary", "probability"),
                   help="ToyJudge mode: binary (the paper's yes/no, default) or probability (graded)")
    p.add_argument("--cache-dir", help="toy base cache (default: $DUALREF_CACHE or ~/.cache/dualref)")
    p.add_argument("--recipe", action="append", default=[], metavar="KEY=VALUE",
                   help="override a toy base recipe value (training/toy/base.py DEFAULT_RECIPE), e.g. "
                        "--recipe base_steps=20 for a smoke build; the base is then cached under its own name")
    p.add_argument("--rebuild-base", action="store_true",
                   help="build the toy base from its recipe instead of unpacking the shipped weights, and write "
                        "them anew to training/toy/weights/ (~12 minutes on 2 cores)")
    p.add_argument("--sft-table", action="store_true", help="also train one SFT LoRA per layout and print base vs SFT")
    p.add_argument("--sft-config", type=Path, default=DEFAULT_SFT_CONFIG, help="SFT config (default: %(default)s)")
    p.add_argument("--sft-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an SFT config key, e.g. --sft-set train.max_steps=10 (repeatable)")
    p.add_argument("--markdown", type=Path, help="also write the tables, command, seeds and wall times here")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def parse_recipe(items) -> dict:
    recipe = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--recipe {item!r}: write KEY=VALUE, e.g. base_steps=20")
        try:
            recipe[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            recipe[key.strip()] = raw
    return recipe


def sft_run(base: Path, manifest: Path, out: Path, layout: str, args) -> tuple[Path, float]:
    """The LoRA of one SFT run (trained now, or reused when ``out`` holds a finished run of the same
    config, base and data) and its training wall time in seconds."""
    # torch-heavy parts load when a stage runs: cached tables print in seconds
    from ..sft.trainer import train

    overrides = [f"model.path={base}", f"data.manifest={manifest}", f"train.layout={layout}",
                 f"run.out_dir={out}", f"run.progress={'false' if args.quiet else 'true'}"] + list(args.sft_set)
    cfg = load_config(args.sft_config, overrides).validate()
    identity = {k: v for k, v in cfg.to_dict().items() if k != "run"}
    identity.update(base=json.loads((base / "dualref.json").read_text()).get("fingerprint"),
                    manifest=file_digest(manifest))
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    stamp = out / "toy_run.json"
    try:
        done = json.loads(stamp.read_text())
    except (OSError, ValueError):
        done = {}
    if done.get("key") == key and done.get("seconds") is not None and Path(done["lora"]).is_file():
        return Path(done["lora"]), done["seconds"]
    if done.get("key") != key:  # another config trained here: start over, never resume across configs
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        stamp.write_text(json.dumps({"key": key}))
    start = time.perf_counter()
    result = train(cfg, resume="auto")
    seconds = round(time.perf_counter() - start, 1)  # of this call (a resumed run: the rest only)
    stamp.write_text(json.dumps({"key": key, "lora": str(result.lora_path), "seconds": seconds,
                                 "steps": result.step, "loss": result.loss, "val_loss": result.val_loss}))
    return Path(result.lora_path), seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # torch-heavy parts load when a stage runs: cached tables print in seconds
    from ..models import load_kontext
    from .base import ship, single_world, toy_base

    started = time.perf_counter()
    progress = not args.quiet
    try:
        recipe = parse_recipe(args.recipe)
        if args.rebuild_base and recipe:
            raise ValueError("--rebuild-base rebuilds the shipped base, which is the default recipe's; leave out --recipe")
        generate_world(args.out / "world", args.seed, args.train, args.test, size=args.size, tasks=TASKS,
                       progress=progress)
        base = toy_base(args.cache_dir, progress=progress, force=args.rebuild_base, **recipe)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.rebuild_base:
        print(f"rebuilt the toy base from its recipe; shipped files written to {ship(base)} (commit them)")
    manifest, evals = args.out / "world" / "manifest.jsonl", args.out / "evals"
    info = json.loads((base / "dualref.json").read_text())
    bundle = functools.lru_cache(maxsize=1)(lambda: load_kontext(base))  # loaded only if an eval is not cached
    single = evaluate(base, single_world(info, progress), evals, layout="diagonal",
                      judge_mode=args.judge_mode, bundle=bundle, progress=progress)
    base_evals = {layout: evaluate(base, manifest, evals, layout=layout, judge_mode=args.judge_mode, bundle=bundle,
                                   progress=progress, with_samples=True) for layout in args.layouts}
    base_rows = {layout: summary for layout, (summary, _) in base_evals.items()}
    vae, pre = info.get("vae", {}), info.get("pretrain", {})
    text = [f"toy base {base.name}: built in {info.get('build_seconds', 0):.0f} s (VAE {vae.get('seconds', 0):.0f} s, "
            f"PSNR {vae.get('psnr', 0):.2f} dB; {pre.get('steps')} pretraining steps)",
            "", f"Base, single-reference edits (its held-out single_edit split, judge {args.judge_mode}):", "",
            questions_markdown("Task", {"single_edit": single["single_edit"]}),
            "", f"Base Table 2 ({args.judge_mode} ToyJudge reward, test split, references fed naively):", "",
            table2_markdown([(f"Base ({layout})", s) for layout, s in base_rows.items()])]
    if args.sft_table:
        rows, gains, notes = [], [], []
        for layout in args.layouts:
            lora, seconds = sft_run(base, manifest, args.out / f"sft-{layout}", layout, args)
            sft, samples = evaluate(base, manifest, evals, layout=layout, lora=lora, judge_mode=args.judge_mode,
                                    bundle=bundle, progress=progress, with_samples=True)
            won = wins(base_rows[layout], sft)
            rows += [(f"Base ({layout})", base_rows[layout]), (f"SFT ({layout})", sft)]
            gains.append((f"SFT - base ({layout})", paired_gains(base_evals[layout][1], samples)))
            notes.append(f"- {layout}: SFT trained {seconds:.0f} s; beats the base on {len(won)}/5 tasks"
                         + ("" if len(won) == 5 else f" (not on {', '.join(t for t in TASKS if t not in won)})"))
        text += ["", f"SFT vs base per layout (SFT trained and sampled with that layout; {args.judge_mode} reward):",
                 "", table2_markdown(rows), ""] + notes
        text += ["", "SFT's gain per task, paired over the same test samples (mean ± standard error):", "",
                 gains_markdown(gains)]
    text += ["", f"(total {time.perf_counter() - started:.0f} s this run)"]
    print("\n".join(text))
    if args.markdown:
        command = "python -m training.toy " + " ".join(argv if argv is not None else sys.argv[1:])
        header = [f"Command: `{command.strip()}` (world seed {args.seed}, {args.train} train / {args.test} test "
                  f"per task, {args.size} px; base recipe seed {info['recipe']['seed']}; torch threads "
                  f"{args.threads or os.environ.get('OMP_NUM_THREADS', 'default')})", ""]
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(header + text) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
