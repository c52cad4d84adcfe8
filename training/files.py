"""Files the jobs write and identify: one atomic-write rule, one content digest, one cache default.

Every file a job writes appears whole or not at all: it is written to ``.<name>.<pid>.tmp`` in the
same folder and renamed over the final name (a rename within a folder is atomic), and the
temporary file is removed if writing fails.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yield the temporary path to write ``path`` through; renamed over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path, value, **dump_kwargs) -> Path:
    """``value`` as JSON (``indent=1`` unless given), atomically, ending with a newline."""
    return write_text(path, json.dumps(value, **{"indent": 1, **dump_kwargs}) + "\n")


def file_digest(path, length: int = 16) -> str:
    """sha256 of a file's bytes (a manifest, a workflow, a LoRA), cut to ``length`` hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def cache_dir_for(manifest, cache_dir=None) -> Path:
    """The latent/text cache of a manifest: ``cache_dir`` when given, else ``<manifest folder>/.cache``
    (shared by SFT, DDPO and the benchmark on the same data)."""
    return Path(cache_dir) if cache_dir else Path(manifest).parent / ".cache"
