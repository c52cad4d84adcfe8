"""Atomic training checkpoints: trainable weights, optimizer, LR schedule, RNG states, data position.

A checkpoint is a folder ``<run>/checkpoints/step_000120/`` written under a temporary name and
renamed when complete, so a crash mid-write never leaves a checkpoint that looks whole. Weights are
safetensors; optimizer/scheduler/RNG states are ``torch.save`` files read back with
``weights_only=True`` (no pickle execution).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next batch
    position: int = 0  # index of the next batch within that epoch
    samples: int = 0  # training samples seen


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir, state: TrainState, module, optimizer, scheduler, config: dict, keep: int = 2,
                    extra=None) -> Path:
    """Write ``<run_dir>/checkpoints/step_<N>`` atomically and drop all but the ``keep`` newest;
    ``extra(folder)`` writes more state (e.g. the EMA) into it before it is renamed into place."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{state.step:07d}"
    tmp = root / f".tmp-step_{state.step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(module), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"format": FORMAT, **asdict(state), "config": config},
                                               indent=1, sort_keys=True))
    if extra is not None:
        extra(tmp)
    if final.exists():  # re-saving the same step (e.g. after an interrupt): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s", final)
    return final


def list_checkpoints(run_dir) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def find_checkpoint(resume, run_dir) -> Path | None:
    """``resume``: True/"latest" (newest in the run folder), or a checkpoint folder."""
    if resume in (None, False):
        return None
    if resume in (True, "latest", "auto"):
        found = list_checkpoints(run_dir)
        if not found:
            if resume == "auto":
                return None
            raise FileNotFoundError(f"--resume: no checkpoint in {Path(run_dir) / 'checkpoints'}; "
                                    "start without --resume, or pass the checkpoint folder")
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume {path}: not a checkpoint folder (no state.json)")
    return path


def load_checkpoint(path, module, optimizer, scheduler) -> TrainState:
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "trainable.safetensors"))
    expected = {n for n, p in module.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"checkpoint {path} does not match this model (missing {missing[:3]}, extra {extra[:3]}); "
                         "resume with the same config (mode, LoRA rank/targets, gates)")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return TrainState(meta["step"], meta["epoch"], meta["position"], meta.get("samples", 0))


def save_sharded_checkpoint(accelerator, run_dir, state: TrainState, scheduler, config: dict) -> Path:
    """FSDP: accelerate writes the sharded model/optimizer/RNG state; we add the data position. Every
    rank calls this; the folder is renamed into place when all ranks are done."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{state.step:07d}", root / f".tmp-step_{state.step:07d}"
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({"format": FORMAT, **asdict(state), "config": config,
                                                    "sharded": True}, indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_sharded_checkpoint(accelerator, path, scheduler) -> TrainState:
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    if not meta.get("sharded"):
        raise ValueError(f"checkpoint {path} was written without FSDP; resume it with train.distributed=ddp")
    accelerator.load_state(str(path))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    return TrainState(meta["step"], meta["epoch"], meta["position"], meta.get("samples", 0))
