"""Held-out checks during and after training: a deterministic validation loss and ODE samples.

Sampling goes through ``training.sampler`` (deterministic Euler, Kontext's schedule) with the same
dual_rope layout the model trains with; outputs are latents of the target's shape (the first
reference's when a sample has no target, as Kontext outputs at the first image's size).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from dual_rope.diffusers_adapter import prepare_references

from .cache import CachedDataset
from .data import to_uint8
from .flow import FlowMatchingModel, slot_generator
from .sampler import SamplerConfig, flux_model_fn, ode_sample

log = logging.getLogger(__name__)

VAL_SIGMAS = (0.2, 0.4, 0.6, 0.8)


def by_bucket(dataset: CachedDataset, indices, batch_size: int) -> list[list[int]]:
    """Split ``indices`` into equal-shape batches, keeping their order within each shape."""
    groups: dict = {}
    for i in indices:
        groups.setdefault(dataset.entries[i].shapes, []).append(i)
    return [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]


@torch.no_grad()
def validation_loss(model: FlowMatchingModel, dataset: CachedDataset, indices, seed: int = 0,
                    batch_size: int = 32, device="cpu") -> float:
    """Mean flow-matching loss over ``indices`` at fixed sigmas with fixed noise: comparable across steps."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for chunk in by_bucket(dataset, indices, batch_size):
        batch = dataset.batch(chunk)
        target = batch.target.to(device)
        refs = [r.to(device) for r in batch.refs]
        for sigma in VAL_SIGMAS:
            noise = torch.stack([torch.randn(tuple(target.shape[1:]), generator=slot_generator(seed, -1, i))
                                 for i in chunk]).to(device)
            sig = torch.full((len(chunk),), sigma, device=device)
            losses = model(target, refs, batch.prompt_embeds.to(device), batch.pooled.to(device), sig, noise)
            total += float(losses.sum())
            count += len(chunk)
    model.train(was_training)
    return total / max(count, 1)


def sampler_config(settings: dict, steps: int | None = None, guidance: float | None = None) -> SamplerConfig:
    """Deterministic Euler settings from the model's ``dualref.json`` defaults."""
    sampling = settings.get("sampling", {})
    g = float(guidance if guidance is not None else sampling.get("guidance", 2.5))
    return SamplerConfig(num_steps=int(steps or sampling.get("num_steps", 28)), noise_level=0.0,
                         shift=sampling.get("shift"), guidance=(g, g))


@torch.no_grad()
def sample_batch(transformer, batch, layout: str, config: SamplerConfig, seeds, gates=None, device="cpu"):
    """ODE samples (B, C, h, w) for a cached batch, the target's latent shape (else reference 1's)."""
    shape = tuple((batch.target if batch.target is not None else batch.refs[0]).shape[1:])
    refs = [r.to(device) for r in batch.refs]
    sequence = prepare_references(shape[-2:], refs, layout, gates)
    guidance = config.guidance[0] if transformer.config.guidance_embeds else None
    model_fn = flux_model_fn(transformer, sequence, batch.prompt_embeds.to(device), batch.pooled.to(device),
                             guidance=guidance)
    return ode_sample(model_fn, shape, seeds, config, device=device)


def image_grid(rows: list[list[np.ndarray]], pad: int = 2) -> "Image.Image":
    """Rows of HxWx3 uint8 tiles (any sizes) -> one PNG-ready image, tiles top-left aligned."""
    from PIL import Image

    cols = max(len(r) for r in rows)
    cell_h = max(t.shape[0] for r in rows for t in r)
    cell_w = max(t.shape[1] for r in rows for t in r)
    canvas = np.full((len(rows) * (cell_h + pad) + pad, cols * (cell_w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (cell_h + pad), pad + j * (cell_w + pad)
            canvas[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    return Image.fromarray(canvas)


@torch.no_grad()
def validation_grid(bundle, model: FlowMatchingModel, dataset: CachedDataset, indices, config: SamplerConfig,
                    path, seed: int = 0, device="cpu") -> Path:
    """Columns: reference 1, reference 2 (if any), target, sample; one row per held-out sample."""
    from .data import load_pixels

    rows = []
    for chunk in by_bucket(dataset, indices, 8):
        batch = dataset.batch(chunk)
        latents = sample_batch(model.transformer, batch, model.layout, config,
                               [seed * 100003 + i for i in chunk], model.gates(), device)
        images = bundle.decode_latents(latents)
        for k, i in enumerate(chunk):
            record = dataset.entries[i].record
            tiles = [to_uint8(load_pixels(p)) for p in record.refs]
            if record.target is not None:
                tiles.append(to_uint8(load_pixels(record.target)))
            tiles.append(to_uint8(images[k]))
            rows.append(tiles)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows).save(path)
    return path
