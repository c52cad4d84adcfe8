"""Shared builders for the DDPO and main-job tests: a micro model, a two-task toy world, a seconds-long
SFT LoRA and a DDPO config that runs an iteration in about a second on one core."""
from __future__ import annotations

import json
from pathlib import Path

from sft_helpers import micro_model, micro_world, sft_config

TASKS = ("animal_scene", "style_transfer")


def micro_setup(root: Path) -> tuple[Path, Path, Path]:
    """``(model folder, manifest, SFT LoRA)``, built once under ``root``."""
    from training.sft.trainer import train

    model = micro_model(root / "micro")
    manifest = root / "world" / "manifest.jsonl"
    if not manifest.is_file():
        micro_world(root / "world", tasks=TASKS, train=8, test=2)
    lora = root / "sft" / "lora.safetensors"
    if not lora.is_file():
        train(sft_config(model, manifest, root / "sft", train={"max_steps": 3}))
    return model, manifest, lora


def ddpo_values(model: Path, manifest: Path, sft_lora: Path | None, out: Path, **sections) -> dict:
    """A config dict: 2 tuples x 4 rollouts per iteration, 3 sampling steps (2 stochastic), minibatches of 4."""
    values = {
        "model": {"path": str(model)},
        "data": {"manifest": str(manifest), "max_pixels": 4096},
        "lora": {"sft": str(sft_lora) if sft_lora else None, "rank": 4},
        "optim": {"lr": 1e-2},
        "rollout": {"num_steps": 3, "noise_level": 0.8, "sde_fraction": 0.67, "guidance": [0.9, 1.1],
                    "eval_steps": 3},
        "ddpo": {"iterations": 2, "prompts_per_iteration": 2, "group_size": 4, "rollout_batch": 3, "train_batch": 4,
                 "train_chunk": 2, "clip_range": 1e-3},
        "judge": {"profile": "toy", "mode": "probability", "retries": 1},
        "eval": {"grid_per_task": 1},
        "run": {"out_dir": str(out), "checkpoint_every": 1, "eval_every": 0, "progress": False},
    }
    for section, update in sections.items():
        if isinstance(values.get(section), dict) and isinstance(update, dict):
            values[section] = {**values[section], **update}
        else:
            values[section] = update
    return values


def ddpo_config(*args, **sections):
    from training.ddpo.config import ddpo_config_from_dict

    return ddpo_config_from_dict(ddpo_values(*args, **sections))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
