"""Sample a manifest split with a model, an optional LoRA and a layout: what benchmarks and tables call.

    outputs = sample_split("toy", "runs/toy/world/manifest.jsonl", lora="runs/sft/lora.safetensors",
                           layout="diagonal")
    requests = [o.judge_request() for o in outputs]          # -> judge.toy.ToyJudge().judge_many(...)

References and instructions come from the shared latent/text cache; sampling is the deterministic
Euler sampler of ``training.sampler`` with the model's defaults (``dualref.json``), seeded per
sample so every model/LoRA/layout starts from the same noise.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cache import CachedDataset, EmbeddingCache, prepare_cache
from .data import Record, load_manifest, to_uint8
from .validation import by_bucket, sample_batch, sampler_config

log = logging.getLogger(__name__)

ADAPTER = "dualref_eval"


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

        from judge.verdict import JudgeRequest

        refs = [Image.open(p).convert("RGB") for p in self.record.refs]
        s = self.record.sample
        return JudgeRequest(s.instruction, refs[0], refs[1] if len(refs) > 1 else None, self.image,
                            sample_id=s.id, task=s.task, plan=s.plan)


@contextlib.contextmanager
def applied_lora(transformer, lora, scale: float = 1.0):
    """Temporarily load a DualRef LoRA file into ``transformer``; yields its metadata (or None)."""
    if lora is None:
        yield None
        return
    from .lora_io import apply_lora_diffusers

    meta = apply_lora_diffusers(transformer, str(lora), adapter_name=ADAPTER, scale=scale)
    try:
        yield meta
    finally:
        transformer.delete_adapters(ADAPTER)


def cached_split(bundle, manifest, split: str = "test", *, tasks=None, limit: int | None = None,
                 require_target: bool = False, cache_dir=None, max_pixels: int = 512 * 512, progress: bool = True):
    """``(entries, CachedDataset)`` of ``split`` (first ``limit`` samples): latents and text embeddings
    from the shared cache beside the manifest (``cache_dir`` to put it elsewhere), computed if absent."""
    records = load_manifest(manifest, split=split, tasks=tasks, require_target=require_target)[:limit]
    cache = EmbeddingCache.for_bundle(Path(cache_dir) if cache_dir else Path(manifest).parent / ".cache", bundle)
    entries, _ = prepare_cache(records, bundle, cache, max_pixels=max_pixels, progress=progress, manifest=manifest)
    return entries, CachedDataset(entries, cache)


def sample_split(model, manifest, *, split: str = "test", lora=None, lora_scale: float = 1.0,
                 layout: str = "diagonal", gates=None, tasks=None, steps: int | None = None,
                 guidance: float | None = None, seed: int = 0, batch_size: int = 16, cache_dir=None,
                 max_pixels: int = 512 * 512, limit: int | None = None, progress: bool = True) -> list[SampleOutput]:
    """Outputs for every sample of ``split`` (in manifest order) from ``model`` (a ``KontextBundle``, a
    folder, or "toy") with ``lora`` (a file or None) placed by ``layout``.

    ``gates``: per-reference strengths; None takes the LoRA's learned gates when it has them.
    """
    from tqdm import tqdm

    from .models import KontextBundle, load_kontext

    bundle = model if isinstance(model, KontextBundle) else load_kontext(model)
    entries, dataset = cached_split(bundle, manifest, split, tasks=tasks, limit=limit, cache_dir=cache_dir,
                                    max_pixels=max_pixels, progress=progress)
    config = sampler_config(bundle.settings, steps, guidance)
    transformer = bundle.transformer
    images: dict[int, np.ndarray] = {}
    with applied_lora(transformer, lora, lora_scale) as meta:
        if meta is not None and meta.layout != layout:
            log.warning("LoRA %s was trained with layout %r but is sampled with %r", lora, meta.layout, layout)
        use_gates = gates if gates is not None else (list(meta.gates) if meta is not None and meta.gates else None)
        chunks = by_bucket(dataset, range(len(dataset)), batch_size)
        for chunk in tqdm(chunks, desc=f"sampling {split} ({layout})", unit="batch", disable=not progress):
            batch = dataset.batch(chunk)
            seeds = [seed * 1_000_003 + i for i in chunk]
            with torch.no_grad():
                latents = sample_batch(transformer, batch, layout, config, seeds, use_gates, bundle.device)
                pixels = bundle.decode_latents(latents)
            for i, p in zip(chunk, pixels):
                images[i] = to_uint8(p)
    return [SampleOutput(entries[i].record, images[i], layout, str(lora) if lora else None)
            for i in range(len(entries))]
