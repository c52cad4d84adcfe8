"""Theme pools and pair sampling: distinct pairs in a seeded order, keyed by content, not by name."""
from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .config import SYMMETRIC_TASKS, ConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_ENUMERATE_LIMIT = 200_000  # below this many candidate pairs, shuffle them all; above, draw at random


@dataclass(frozen=True)
class PoolImage:
    path: Path
    sha: str  # of the file's bytes: renamed or copied files are still the same image
    theme: str


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def store_image(path: Path, sha: str, folder: Path) -> Path:
    """The pool image ``path`` (of content ``sha``) in ``folder`` as ``<sha><ext>``: a hard link (no
    extra space), or a copy where a link is impossible (another file system, no link support).
    Content-addressed, so an image used by many pairs is stored once. OSError, naming the file,
    when it is gone or no longer holds the image it held when the pair was made."""
    dest = folder / f"{sha}{path.suffix.lower()}"
    if dest.is_file():
        return dest
    if not path.is_file():
        raise OSError(f"{path} is gone")
    if file_sha(path) != sha:
        raise OSError(f"{path} changed since the pair was made")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.link(path, dest)
    except FileExistsError:
        pass  # stored meanwhile (same content, by its name)
    except OSError as e:
        log.debug("cannot hard-link %s (%s); copying", path, e)
        part = dest.with_name(dest.name + ".part")
        shutil.copyfile(path, part)
        part.replace(dest)  # never a half-written image under the final name
    return dest


def scan_pools(pools: dict[str, Path]) -> dict[str, list[PoolImage]]:
    """Every image file under each theme folder (recursively), duplicates by content dropped."""
    found: dict[str, list[PoolImage]] = {}
    for theme, folder in pools.items():
        if not folder.is_dir():
            raise ConfigError(f"pool {theme!r}: {folder} is not a folder; create it or fix pools.{theme} in the config")
        seen, images = set(), []
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            sha = file_sha(path)
            if sha in seen:
                log.info("pool %s: %s repeats an earlier image; skipped", theme, path.name)
                continue
            seen.add(sha)
            images.append(PoolImage(path, sha, theme))
        if not images:
            log.warning("pool %r (%s) has no images (%s)", theme, folder, ", ".join(IMAGE_SUFFIXES))
        found[theme] = images
    return found


def pair_key(task: str, sha1: str, sha2: str) -> str:
    """The pair's identity: task + both images' content (order-free for symmetric tasks)."""
    a, b = sorted((sha1, sha2)) if task in SYMMETRIC_TASKS else (sha1, sha2)
    return hashlib.sha256(f"{task}\n{a}\n{b}".encode()).hexdigest()[:20]


def sample_id(task: str, key: str) -> str:
    return f"{task}-{key[:12]}"


def candidates_for(task: str, themes, pools: dict[str, list[PoolImage]]) -> tuple[list[PoolImage], list[PoolImage]]:
    """Image-1 and image-2 candidates of a task; an error naming the missing pools if one side is empty."""
    sides = []
    for side, names in zip(("image 1", "image 2"), themes):
        images = [im for name in names for im in pools.get(name, [])]
        if not images:
            raise ConfigError(
                f"task {task!r} needs images of theme {' or '.join(names)} for {side}; "
                f"add a pool for {names[0]!r} (pools.{names[0]}) with images in it"
            )
        sides.append(images)
    return sides[0], sides[1]


def iter_pairs(task: str, first: list[PoolImage], second: list[PoolImage], seed: int) -> Iterator[tuple[PoolImage, PoolImage, str]]:
    """Distinct (image 1, image 2, key) in an order fixed by ``seed``: a rerun meets them in the same order."""
    rng = random.Random(f"{seed}:{task}")
    seen: set[str] = set()

    def valid(a: PoolImage, b: PoolImage):
        if a.sha == b.sha:
            return None
        key = pair_key(task, a.sha, b.sha)
        if key in seen:
            return None
        seen.add(key)
        return key

    total = len(first) * len(second)
    if total <= _ENUMERATE_LIMIT:
        order = list(range(total))
        rng.shuffle(order)
        for index in order:
            a, b = first[index // len(second)], second[index % len(second)]
            key = valid(a, b)
            if key:
                yield a, b, key
        return
    misses = 0
    while misses < 1000:  # a long run of repeats: the pools are (nearly) used up
        a, b = rng.choice(first), rng.choice(second)
        key = valid(a, b)
        if key:
            misses = 0
            yield a, b, key
        else:
            misses += 1


def _bucket(key: str) -> float:
    return int(hashlib.sha256(("split:" + key).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def split_of(key: str, test_fraction: float) -> str:
    """train/test by the key's hash: stable across runs and resumes, whatever order samples finish in."""
    return "test" if _bucket(key) < test_fraction else "train"


def assign_splits(keys_by_task: dict[str, list[str]], test_fraction: float) -> dict[str, str]:
    """``{key: split}`` by :func:`split_of`, except that a task with at least 2 samples and a
    ``test_fraction`` above 0 always gets a test sample: its sample of lowest hash (which is
    already a test sample whenever the task has one by hash, so the hash split is kept where it
    gives one)."""
    splits = {}
    for keys in keys_by_task.values():
        own = {k: split_of(k, test_fraction) for k in keys}
        if test_fraction > 0 and len(keys) >= 2 and "test" not in own.values():
            own[min(keys, key=_bucket)] = "test"
        splits.update(own)
    return splits
