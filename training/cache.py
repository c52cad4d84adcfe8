"""A cache of VAE latents and text embeddings in safetensors, keyed by content, shared by SFT, DDPO
and the benchmark.

An image entry's key hashes the image file's bytes, the VAE's fingerprint and the size it is encoded
at; a text entry's key hashes the text and the fingerprint of both text encoders, their tokenizers
and the T5 length. A changed file or model therefore never reuses a stale entry, and an unchanged
one is never encoded twice: reruns (and other stages) only read. Each entry is written atomically
(temporary file + rename), so an interrupted caching run resumes where it stopped.

Layout: ``<cache>/latents/ab/<key>.safetensors`` ({"latent": (C, h, w)}) and
``<cache>/text/ab/<key>.safetensors`` ({"prompt_embeds": (L, D), "pooled": (D,)}).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from judge.manifest import ManifestError

from .data import Record, assign_buckets, image_size, load_pixels
from .files import atomic_path

log = logging.getLogger(__name__)


class EmbeddingCache:
    def __init__(self, root, vae_fingerprint: str, text_fingerprint: str):
        self.root = Path(root)
        self.vae_fingerprint, self.text_fingerprint = vae_fingerprint, text_fingerprint

    @classmethod
    def for_bundle(cls, root, bundle) -> "EmbeddingCache":
        return cls(root, bundle.fingerprint("vae"), bundle.fingerprint("text"))

    def image_key(self, path: Path, size: tuple[int, int]) -> str:
        digest = hashlib.sha256(Path(path).read_bytes())
        # "cover": resized to cover ``size`` and centre-cropped (training.data.load_pixels)
        digest.update(f"|vae={self.vae_fingerprint}|size={size[0]}x{size[1]}|cover".encode())
        return digest.hexdigest()[:32]

    def text_key(self, text: str) -> str:
        return hashlib.sha256(f"{text}|text={self.text_fingerprint}".encode()).hexdigest()[:32]

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def has(self, kind: str, key: str) -> bool:
        return self.path(kind, key).is_file()

    def load(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path(kind, key)))

    def save(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        with atomic_path(self.path(kind, key)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


@dataclass
class Entry:
    """A record with its cache keys and the sizes its images are encoded at."""

    record: Record
    ref_keys: list[str]
    ref_sizes: list[tuple[int, int]]
    target_key: str | None
    target_size: tuple[int, int] | None
    text_key: str
    scale: int  # VAE downsampling

    @property
    def shapes(self) -> tuple:
        """Latent (h, w) of the target and each reference: the bucket key."""
        sizes = ([self.target_size] if self.target_size else [None]) + self.ref_sizes
        return tuple(None if s is None else (s[0] // self.scale, s[1] // self.scale) for s in sizes)


@dataclass
class CacheStats:
    images_cached: int = 0
    images_computed: int = 0
    texts_cached: int = 0
    texts_computed: int = 0
    failed: list = None

    @property
    def all_hits(self) -> bool:
        return self.images_computed == 0 and self.texts_computed == 0


def _progress(items, desc, enabled):
    if not enabled or not items:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="item", mininterval=1.0)


def prepare_cache(records: list[Record], bundle, cache: EmbeddingCache, *, max_pixels: int,
                  batch_size: int = 16, progress: bool = True, skip_bad: bool = False,
                  manifest="manifest", share: int | None = None, part: tuple[int, int] = (0, 1)):
    """Key every record and encode what the cache lacks. Returns ``(entries, stats)``.

    Images are sized by their aspect-ratio bucket (:func:`training.data.assign_buckets`); ``share``
    (training samples per process per batch) lets samples move to a next-nearest bucket so that
    more of them fill whole batches.

    A record whose image fails to decode stops the run naming its manifest line, or with ``skip_bad``
    is left out and listed in ``stats.failed`` as ``(line_no, reason)``.

    ``part=(rank, processes)``: encode only this process's share of what is missing (every process
    keys all records the same way, so the shares cover it once); the processes then meet at a barrier
    and each reads the whole cache (:func:`encode_shared`).
    """
    rank, processes = part

    def mine(key: str) -> bool:  # keys are hex digests: an even split that no process's progress changes
        return processes == 1 or int(key[:8], 16) % processes == rank

    multiple, scale = bundle.pixel_multiple, bundle.vae_scale_factor
    stats, entries, failed = CacheStats(), [], []
    readable, dims = [], []
    for record in records:
        try:
            dims.append([image_size(p) for p in ([record.target] if record.target else []) + record.refs])
            readable.append(record)
        except OSError as e:
            failed.append((record.line_no, f"cannot read an image ({e})"))
    # sizes per sample: the target (if any), then each reference; samples of one shape batch together
    for record, sizes in zip(readable, assign_buckets(dims, max_pixels, multiple, share)):
        target_size = sizes[0] if record.target else None
        ref_sizes = list(sizes[1:] if record.target else sizes)
        ref_keys = [cache.image_key(p, s) for p, s in zip(record.refs, ref_sizes)]
        target_key = cache.image_key(record.target, target_size) if record.target else None
        entries.append(Entry(record, ref_keys, ref_sizes, target_key, target_size,
                             cache.text_key(record.sample.instruction), scale))
    # Images to encode, grouped by size so VAE batches are rectangular.
    todo: dict[str, tuple[Path, tuple[int, int], int]] = {}
    for e in entries:
        pairs = list(zip(e.ref_keys, e.record.refs, e.ref_sizes))
        if e.target_key:
            pairs.append((e.target_key, e.record.target, e.target_size))
        for key, path, size in pairs:
            if not mine(key):
                continue
            if key in todo or cache.has("latents", key):
                stats.images_cached += key not in todo
                continue
            todo[key] = (path, size, e.record.line_no)
    broken: set[int] = set()
    by_size: dict[tuple[int, int], list[str]] = {}
    for key, (_, size, _) in todo.items():
        by_size.setdefault(size, []).append(key)
    chunks = [keys[i:i + batch_size] for keys in by_size.values() for i in range(0, len(keys), batch_size)]
    for chunk in _progress(chunks, "caching latents", progress):
        pixels, keys = [], []
        for key in chunk:
            path, size, line_no = todo[key]
            try:
                pixels.append(load_pixels(path, size))
                keys.append(key)
            except (OSError, ValueError) as err:
                failed.append((line_no, f"image {path} cannot be decoded ({err})"))
                broken.add(line_no)
        if pixels:
            latents = bundle.encode_images(torch.stack(pixels))
            for key, latent in zip(keys, latents):
                cache.save("latents", key, {"latent": latent})
            stats.images_computed += len(keys)
    entries = [e for e in entries if e.record.line_no not in broken]
    texts = {}
    for e in entries:
        if not mine(e.text_key):
            continue
        if e.text_key not in texts and not cache.has("text", e.text_key):
            texts[e.text_key] = e.record.sample.instruction
        elif e.text_key not in texts:
            stats.texts_cached += 1
    items = list(texts.items())
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    for chunk in _progress(chunks, "caching text", progress):
        embeds, pooled = bundle.encode_prompts([t for _, t in chunk])
        for (key, _), e, p in zip(chunk, embeds, pooled):
            cache.save("text", key, {"prompt_embeds": e, "pooled": p})
        stats.texts_computed += len(chunk)
    if failed and not skip_bad:
        lines = "\n".join(f"  line {n}: {r}" for n, r in failed)
        raise ManifestError(manifest, failed[0][0],
                            f"{len(failed)} sample(s) could not be encoded:\n{lines}\n"
                            "Fix the images, or pass --skip-bad (data.skip_bad=true)")
    stats.failed = failed
    return entries, stats


def encode_shared(record_sets, bundle, cache: EmbeddingCache, accelerator, *, progress: bool = True, **kwargs):
    """``prepare_cache`` for each ``(records, share)`` in ``record_sets`` on every process: each process
    first encodes its share of what the cache lacks, then, after a barrier, reads the whole cache.
    Returns one ``(entries, stats)`` per set, the same on every process (encoding stats: this process's)."""
    processes, rank = accelerator.num_processes, accelerator.process_index
    if processes > 1:
        for records, share in record_sets:
            # a bad image is reported by the reading pass below, on every process alike, not here on one
            prepare_cache(records, bundle, cache, progress=progress and accelerator.is_main_process, share=share,
                          part=(rank, processes), **{**kwargs, "skip_bad": True})
        accelerator.wait_for_everyone()
    return [prepare_cache(records, bundle, cache, progress=progress and accelerator.is_main_process and processes == 1,
                          share=share, **kwargs) for records, share in record_sets]


@dataclass
class Batch:
    """Stacked latents of equal-shape samples (the order of ``indices``)."""

    indices: list[int]
    target: torch.Tensor | None  # (B, C, h, w)
    refs: list[torch.Tensor]  # one (B, C, h_k, w_k) per reference
    prompt_embeds: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor  # (B, D')

    def __len__(self) -> int:
        return len(self.indices)


class CachedDataset:
    """Samples as cached tensors; ``preload`` keeps them in memory (small data), else reads per batch."""

    def __init__(self, entries: list[Entry], cache: EmbeddingCache, preload: bool = True):
        self.entries, self.cache = entries, cache
        self._memo: dict[tuple[str, str], dict] | None = {} if preload else None

    def __len__(self) -> int:
        return len(self.entries)

    def bucket_keys(self) -> list:
        return [e.shapes for e in self.entries]

    def _get(self, kind: str, key: str) -> dict:
        if self._memo is None:
            return self.cache.load(kind, key)
        if (kind, key) not in self._memo:
            self._memo[(kind, key)] = self.cache.load(kind, key)
        return self._memo[(kind, key)]

    def batch(self, indices) -> Batch:
        entries = [self.entries[i] for i in indices]
        shapes = {e.shapes for e in entries}
        if len(shapes) != 1:
            raise ValueError(f"a batch mixes latent shapes {sorted(shapes, key=repr)}; batch per bucket")
        has_target = entries[0].target_key is not None
        target = torch.stack([self._get("latents", e.target_key)["latent"] for e in entries]) if has_target else None
        refs = [torch.stack([self._get("latents", e.ref_keys[k])["latent"] for e in entries])
                for k in range(len(entries[0].ref_keys))]
        texts = [self._get("text", e.text_key) for e in entries]
        return Batch(list(indices), target, refs, torch.stack([t["prompt_embeds"] for t in texts]),
                     torch.stack([t["pooled"] for t in texts]))
