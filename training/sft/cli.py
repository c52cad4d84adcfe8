"""Dual-reference LoRA fine-tuning of Kontext (paper Sec. 3.2): ``python -m training.sft --config CFG``.

    python -m training.sft --config training/configs/toy_sft.json
    python -m training.sft --config my.yaml --set optim.lr=1e-4 --set data.batch_size=8 --resume
    accelerate launch --num_processes 8 -m training.sft --config training/configs/kontext_sft.json

Writes into ``run.out_dir``: ``config.json``, ``metrics.jsonl``, ``checkpoints/step_*``,
``val/step_*.png``, ``skipped.jsonl`` (with --skip-bad) and ``lora.safetensors`` (DESIGN contract 4).
The loop itself is :func:`training.sft.trainer.train`.
"""
from __future__ import annotations

import argparse
import logging
import sys

from judge.manifest import ManifestError

from ..config import ConfigError, load_config
from ..model_files import ModelFileError
from ..interrupts import sigterm_interrupts
from ..toy.base import resolve_model_path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.sft", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="JSON or YAML file (see training/config.py for every key)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set optim.lr=1e-4 (repeatable; values are JSON)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue from the newest checkpoint of the run folder, or from the one given")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad manifest lines (listed in skipped.jsonl)")
    parser.add_argument("--out", help="run folder (run.out_dir)")
    parser.add_argument("--max-steps", type=int, help="train.max_steps")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.skip_bad:
        overrides.append("data.skip_bad=true")
    if args.out:
        overrides.append(f"run.out_dir={args.out}")
    if args.max_steps:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.quiet:
        overrides.append("run.progress=false")
    try:
        cfg = load_config(args.config, overrides).validate()
        # heavy imports (torch, diffusers) after the config checks: --help and a bad value answer at once
        from .trainer import train

        cfg.model.path = resolve_model_path(cfg.model.path, cfg.model.toy_cache_dir, progress=cfg.run.progress)
        with sigterm_interrupts():  # a scheduler's or torchrun's stop takes the Ctrl-C path: checkpoint
            result = train(cfg, resume=args.resume)
    except (ConfigError, ManifestError, ModelFileError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    if result.lora_path or result.transformer_dir:
        print(f"done: {result.step} steps, loss {result.loss:.4f}"
              + (f", held-out loss {result.val_loss:.4f}" if result.val_loss is not None else ""))
        print(f"  {'LoRA' if result.lora_path else 'transformer'}: {result.lora_path or result.transformer_dir}")
        print(f"  metrics: {result.metrics_path}")
    return 0
