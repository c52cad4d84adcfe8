"""Sampling a cached split with a model and judging what comes out: the one path that validation,
DDPO's held-out check, the benchmark's headless generator and the toy tables share.

    entries, dataset = cached_split(bundle, "runs/toy/world/manifest.jsonl", "test")
    outputs = sample_split(bundle, "runs/toy/world/manifest.jsonl", lora="runs/sft/lora.safetensors")
    requests = [o.judge_request() for o in outputs]          # -> judge.toy.ToyJudge().judge_many(...)

Sampling is the deterministic Euler sampler of ``training.sampler`` with the model's defaults
(``dualref.json``) and the dual_rope layout the model trains with; outputs are latents of the
target's shape (the first reference's when a sample has no target, as Kontext outputs at the first
image's size). Every sample's noise comes from :func:`sample_seed`, so every model, LoRA and layout
starts sample ``i`` from the same noise. Also here: the deterministic validation loss and the
validation grid.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dual_rope.diffusers_adapter import prepare_references
from judge.verdict import JudgeRequest

from .cache import CachedDataset, EmbeddingCache, prepare_cache
from .data import Record, load_manifest, load_pixels, to_uint8
from .files import cache_dir_for
from .flow import FlowMatchingModel, slot_generator
from .lora_io import merge_lora
from .sampler import SamplerConfig, flux_model_fn, ode_sample
from .seeds import sample_seed

log = logging.getLogger(__name__)

VAL_SIGMAS = (0.2, 0.4, 0.6, 0.8)

VAL_SIGMAS = (0.2, 0.4, 0.6, 0.8)


def by_bucket(dataset: CachedDataset, items, batch_size: int, key=None) -> list[list]:
    """Split ``items`` (dataset indices, or anything ``key`` maps to one) into batches of at most
    ``batch_size`` whose samples have equal latent shapes, keeping their order within each shape."""
    groups: dict = {}
    for item in items:
        groups.setdefault(dataset.entries[key(item) if key else item].shapes, []).append(item)
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


def sample_images(bundle, transformer, dataset: CachedDataset, indices, layout: str, config: SamplerConfig,
                  seed: int, gates=None, *, batch_size: int = 16, progress: bool = False, desc: str = "sampling",
                  part: tuple[int, int] = (0, 1)):
    """Yield ``(chunk, images)``: ODE samples of ``indices`` in equal-shape batches, decoded to HxWx3
    uint8, sample ``i`` seeded by :func:`sample_seed` (seed, i), on the bundle's device.

    ``part=(rank, processes)``: every ``processes``-th of the batches one process would sample, from
    the ``rank``-th: the same batches, so each output is the one a single process makes."""
    from tqdm import tqdm

    chunks = by_bucket(dataset, indices, batch_size)[part[0]::part[1]]
    for chunk in tqdm(chunks, desc=desc, unit="batch", disable=not progress):
        with torch.no_grad():
            latents = sample_batch(transformer, dataset.batch(chunk), layout, config,
                                   [sample_seed(seed, i) for i in chunk], gates, bundle.device)
            pixels = bundle.decode_latents(latents)
        yield chunk, [to_uint8(p) for p in pixels]


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
                    path, seed: int = 0) -> Path | None:
    """Columns: reference 1, reference 2 (if any), target, sample; one row per held-out sample.
    ``path`` None: sample only (the other processes of an FSDP run, whose forward is a collective)."""
    rows = []
    for chunk, images in sample_images(bundle, model.transformer, dataset, indices, model.layout, config, seed,
                                       model.gates(), batch_size=8):
        for k, i in enumerate(chunk):
            record = dataset.entries[i].record
            tiles = [to_uint8(load_pixels(p)) for p in record.refs]
            if record.target is not None:
                tiles.append(to_uint8(load_pixels(record.target)))
            tiles.append(images[k])
            rows.append(tiles)
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows).save(path)
    return path


@dataclass
class SampleOutput:
    record: Record
    image: np.ndarray  # HxWx3 uint8
    layout: str
    lora: str | None

    @property
    def sample(self):
        return self.record.sample

    def judge_request(self):
        """A ``judge.verdict.JudgeRequest`` for this output (references read from disk)."""
        from PIL import Image

        refs = [Image.open(p).convert("RGB") for p in self.record.refs]
        s = self.record.sample
        return JudgeRequest.of(s.instruction, refs, self.image, sample_id=s.id, task=s.task, plan=s.plan)


@contextlib.contextmanager
def applied_loras(bundle, loras):
    """Merge DualRef LoRA files ``[(path, scale)]`` into the bundle's transformer, one after the other,
    as ComfyUI applies stacked LoRAs (SFT + DDPO through DualLoRAApply); yields their metadata.

    Merged weights sample at the base's speed (a peft adapter adds its own products and element-wise
    work to every layer: on the toy, SFT + DDPO as adapters sampled 1.2-1.7x slower). On exit the merged
    transformer is dropped, so the next use loads the base again from its files: exactly the base,
    without a second copy of the weights in memory."""
    try:
        yield [merge_lora(bundle.transformer, path, scale) for path, scale in loras]
    finally:
        if loras:
            bundle.release("transformer")


def cached_split(bundle, manifest, split: str = "test", *, tasks=None, limit: int | None = None,
                 require_target: bool = False, cache_dir=None, max_pixels: int = 512 * 512, progress: bool = True):
    """``(entries, CachedDataset)`` of ``split`` (first ``limit`` samples): latents and text embeddings
    from the shared cache beside the manifest (``cache_dir`` to put it elsewhere), computed if absent."""
    records = load_manifest(manifest, split=split, tasks=tasks, require_target=require_target)[:limit]
    cache = EmbeddingCache.for_bundle(cache_dir_for(manifest, cache_dir), bundle)
    entries, _ = prepare_cache(records, bundle, cache, max_pixels=max_pixels, progress=progress, manifest=manifest)
    return entries, CachedDataset(entries, cache)


def sample_split(bundle, manifest, *, split: str = "test", lora=None, lora_scale: float = 1.0,
                 layout: str = "diagonal", gates=None, tasks=None, steps: int | None = None,
                 guidance: float | None = None, seed: int = 0, batch_size: int = 16, cache_dir=None,
                 max_pixels: int = 512 * 512, limit: int | None = None, progress: bool = True) -> list[SampleOutput]:
    """Outputs for every sample of ``split`` (in manifest order) from the loaded model ``bundle``
    (:func:`training.models.load_model`) with ``lora`` (a file or None) placed by ``layout``.

    ``gates``: per-reference strengths; None takes the LoRA's learned gates when it has them.
    """
    entries, dataset = cached_split(bundle, manifest, split, tasks=tasks, limit=limit, cache_dir=cache_dir,
                                    max_pixels=max_pixels, progress=progress)
    config = sampler_config(bundle.settings, steps, guidance)
    images: dict[int, np.ndarray] = {}
    with applied_loras(bundle, [(lora, lora_scale)] if lora else []) as metas:
        meta = metas[0] if metas else None
        if meta is not None and meta.layout != layout:
            log.warning("LoRA %s was trained with layout %r but is sampled with %r", lora, meta.layout, layout)
        use_gates = gates if gates is not None else (list(meta.gates) if meta is not None and meta.gates else None)
        for chunk, pixels in sample_images(bundle, bundle.transformer, dataset, range(len(dataset)), layout, config,
                                           seed, use_gates, batch_size=batch_size, progress=progress,
                                           desc=f"sampling {split} ({layout})"):
            images.update(zip(chunk, pixels))
    return [SampleOutput(entries[i].record, images[i], layout, str(lora) if lora else None)
            for i in range(len(entries))]
