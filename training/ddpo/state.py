"""The DDPO policy's weights: the frozen SFT LoRA merged into the base, the trainable DDPO LoRA on
top, its atomic checkpoints and its export (DESIGN contract 4, stage ``ddpo``).

Why merge: ``W' = W + (alpha/r) B A`` is exactly what a stacked adapter adds at inference (ComfyUI's
DualLoRAApply and diffusers' stacked adapters both add the two LoRAs' products to ``W``), so the
merged model *is* the SFT model, the SFT LoRA cannot be trained by mistake, and "the adapter
disabled" (the KL reference) is the SFT model. Only the DDPO LoRA exists as a peft adapter.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from ..checkpoint import TrainState, list_checkpoints, load_checkpoint, save_checkpoint
from ..config import ConfigError
from ..files import file_digest
from ..lora_io import check_lora_base, lora_content_hash, save_lora

log = logging.getLogger(__name__)

ADAPTER = "ddpo"


def check_sft_lora(path, fingerprint: str, layout: str | None, shown=None) -> "LoraMetadata | None":  # noqa: F821
    """The SFT LoRA against the base and ``run.layout`` before any data is encoded or rollout sampled:
    DualLoRAApply's check (another architecture or base is an error naming ``shown``, the user's file)."""
    shown = shown or path
    meta = check_lora_base(path, fingerprint, shown)
    if meta is None:
        log.warning("%s has no DualRef metadata: its base model and layout cannot be checked", shown)
    elif layout and meta.layout != layout:
        raise ConfigError(f"run.layout={layout!r} but the SFT LoRA {shown} was trained with {meta.layout!r}; "
                          "the DDPO LoRA must use its SFT LoRA's layout (leave run.layout unset)")
    return meta


def add_ddpo_adapter(transformer, rank: int, alpha: float | None, target_modules, seed: int = 0) -> list[torch.nn.Parameter]:
    """A fresh DDPO LoRA (B = 0, so the policy starts as the SFT model); returns its fp32 parameters.
    Its random A comes from ``seed`` alone (not the global RNG), so a run is reproducible."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=True, target_modules=list(target_modules))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(config, adapter_name=ADAPTER)
    transformer.set_adapter(ADAPTER)
    params = [p for n, p in transformer.named_parameters() if f".{ADAPTER}." in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def constant_schedule(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def save(run_dir, iteration: int, transformer, optimizer, scheduler, algo_state: dict, config: dict,
         keep: int, ema=None) -> Path:
    """``<run>/checkpoints/step_<iteration>`` (the trainer's atomic format); ``algo_state`` (baseline,
    per-prompt statistics) rides in its state.json, the EMA (when on) in its own file."""
    return save_checkpoint(run_dir, TrainState(step=iteration), transformer, optimizer, scheduler,
                           {"ddpo": config, "algo_state": algo_state}, keep, extra=ema.save if ema else None)


def restore(path, transformer, optimizer, scheduler, ema=None) -> tuple[int, dict]:
    """Load a checkpoint into the model/optimizer (and EMA); ``(iterations done, algo_state)``."""
    state = load_checkpoint(path, transformer, optimizer, scheduler)
    if ema is not None:
        ema.load(path)
    saved = json.loads((Path(path) / "state.json").read_text())["config"]
    return state.step, saved["algo_state"]


def snapshot(params, optimizer, baseline, tracker, ema=None) -> dict:
    """A copy (on the CPU) of everything an iteration's update changes, to put back on Ctrl-C."""
    import copy

    return {"params": [p.detach().to("cpu", copy=True) for p in params],
            "optimizer": _to_cpu(optimizer.state_dict()),
            "baseline": copy.deepcopy(baseline.state_dict()), "tracker": copy.deepcopy(tracker.state_dict()),
            "ema": None if ema is None else ([s.detach().to("cpu", copy=True) for s in ema.model.shadow_params],
                                             ema.model.optimization_step)}


@torch.no_grad()
def restore_snapshot(saved: dict, params, optimizer, baseline, tracker, ema=None) -> None:
    for p, value in zip(params, saved["params"]):
        p.copy_(value)
    optimizer.load_state_dict(saved["optimizer"])  # moves the state back to the parameters' device
    baseline.load_state_dict(saved["baseline"])
    tracker.load_state_dict(saved["tracker"])
    if ema is not None:
        shadows, ema.model.optimization_step = saved["ema"]
        for s, value in zip(ema.model.shadow_params, shadows):
            s.copy_(value)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def latest(run_dir) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def export_ddpo_lora(path, transformer, *, layout: str, base_fingerprint: str, sft_path, rank: int,
                     alpha: float | None, iterations: int, samples_per_iteration: int, world_size: int, seed: int,
                     lr: float, max_pixels: int, precision: str, manifest,
                     dtype: torch.dtype = torch.bfloat16) -> "LoraMetadata":  # noqa: F821
    """Write the DDPO LoRA: stage ddpo, the SFT LoRA's layout, the *original* base's fingerprint and
    the SFT LoRA's content hash, so DualLoRAApply checks it belongs on top of that SFT LoRA."""

    train = {"steps": int(iterations), "batch_size": int(samples_per_iteration), "world_size": int(world_size),
             "seed": int(seed), "learning_rate": float(lr), "resolution": int(math.isqrt(int(max_pixels))),
             "references": 2, "precision": precision,
             "dataset_hash": file_digest(manifest)}
    meta = {"layout": layout, "stage": "ddpo", "base_fingerprint": base_fingerprint,
            "sft_lora": lora_content_hash(sft_path), "rank": rank, "alpha": float(alpha or rank), "train": train}
    return save_lora(path, transformer, meta, adapter_name=ADAPTER, dtype=dtype)
