"""The project's seed rules: one per-sample seed for sampling a selection, one keyed generator for
every other named draw (training noise, DDPO's prompts, noise, guidance and steps)."""
from __future__ import annotations

import hashlib

SEED_STRIDE = 1_000_003  # a prime above any split's size: the seeds of two base seeds never meet


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a selection sampled with base ``seed`` (benchmark, evaluation,
    validation grids, DDPO's held-out check, ComfyUI's KSampler): every model starts from the same noise."""
    return int(seed) * SEED_STRIDE + int(index)


def keyed_generator(namespace: str, seed: int, *parts) -> torch.Generator:
    """A CPU generator for one named draw, e.g. ``("dualref-ddpo", seed, "noise", iteration, slot)``:
    the same key gives the same numbers on every process and after a resume."""
    import torch  # here, not at the top: the benchmark's CLI reads sample_seed without loading torch

    key = ":".join([namespace, str(int(seed))] + [str(p) for p in parts])
    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
