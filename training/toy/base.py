"""The toy base: our stand-in for Kontext-dev, a tiny single-reference editor, built once and cached.

``toy_base()`` generates the DualShapes ``single_edit`` data, trains the tiny VAE on toy images
(kept on its own in ``<cache>/toy-vae-<key>/``, so base recipes that differ only in pretraining
reuse it), then pretrains the tiny transformer on single-reference edits with the project's one trainer in
``full`` mode, and keeps the result as a diffusers folder under
``<cache>/toy-base-<recipe hash>/`` (default cache: ``$DUALREF_CACHE`` or ``~/.cache/dualref``).
The first call takes minutes and shows progress; later calls return the folder at once. An
interrupted build resumes (the VAE and the pretraining from their last checkpoints). Concurrent callers wait on
a file lock instead of building twice.

The default recipe's base also ships with the pack (``training/toy/weights/``, half precision, as
Kontext-dev ships from its makers): with the default recipe ``toy_base()`` unpacks it into the cache in
a second instead of building it. ``python -m training.toy --rebuild-base`` builds it from the recipe
and writes those files anew; a test checks that they carry the current recipe's key.

    python -m training.toy.base [--cache-dir DIR] [--force]
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..config import SFTConfig
from ..models import load_kontext
from ..sft.trainer import train
from .models import (
    TOY_CONFIGS,
    TOY_MAX_SEQUENCE_LENGTH,
    build_components,
    reconstruction_error,
    save_folder,
    set_latent_normalisation,
    toy_config,
    train_vae,
)
from .templates import vocabulary
from .world import ALL_TASKS, WORLD_VERSION, generate_world, make_sample

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).parent / "weights"  # the default recipe's base, as the pack ships it
SHIPPED_DTYPE = torch.float16  # fp16 keeps 10 mantissa bits (bf16: 7); the toy's weights are far from its range
RECIPE_VERSION = 3  # bumped when the recipe changes what a key would not show; history in docs/recipes.md
# Its build ships as training/toy/weights (the main job unpacks it); why each value is what it is: docs/recipes.md.
DEFAULT_RECIPE = {
    "seed": 0,
    "size": 64,
    "single_train": 2048, "single_test": 64,  # single_edit samples of the pretraining world
    "vae_images": 1536, "vae_steps": 4000, "vae_batch": 16, "vae_lr": 1.5e-3, "vae_crop": 32,
    "base_steps": 1000, "base_batch": 32, "base_lr": 3e-3, "base_edit_weight": 1.0,
    "qk_norm_init": 2.0, "base_sigma_sampling": "logit_normal", "base_sigma_shift": 3.0,
    "guidance": 1.0, "sample_steps": 12,
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("DUALREF_CACHE", "~/.cache/dualref")).expanduser()


VAE_KEYS = ("seed", "size", "vae_images", "vae_steps", "vae_batch", "vae_lr", "vae_crop")


def _key(payload: dict, config_files) -> str:
    configs = {str(p.relative_to(TOY_CONFIGS)): json.loads(p.read_text()) for p in sorted(config_files)}
    blob = json.dumps({"version": RECIPE_VERSION, "world": WORLD_VERSION, "recipe": payload, "configs": configs},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def recipe_key(recipe: dict) -> str:
    """Names the base folder: every recipe value and every toy config."""

    return _key(recipe, TOY_CONFIGS.rglob("*.json"))


def vae_key(recipe: dict) -> str:
    """Names the trained-VAE folder: only what the VAE depends on, so other base recipes reuse it."""

    return _key({k: recipe[k] for k in VAE_KEYS}, [TOY_CONFIGS / "vae" / "config.json"])


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def vae_images(recipe: dict, split: str, count: int) -> torch.Tensor:
    """References and targets of every toy task (``split``), as (N, 3, H, W) in [-1, 1]."""

    arrays, index = [], 0
    while len(arrays) < count:
        for task in ALL_TASKS:
            s = make_sample(task, recipe["seed"], index, split, recipe["size"])
            arrays += [a for a in s.refs + [s.target] if a.shape[:2] == (recipe["size"], recipe["size"])]
        index += 1
    x = torch.from_numpy(np.stack(arrays[:count])).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def trained_vae(cache: Path, recipe: dict, progress: bool):
    """The toy VAE trained on toy images, from ``<cache>/toy-vae-<key>/`` or trained (once) now."""
    from diffusers import AutoencoderKL

    folder = cache / f"toy-vae-{vae_key(recipe)}"
    with _lock(cache / f".{folder.name}.lock"):  # base recipes that share this VAE train it once
        if (folder / "stats.json").is_file():
            return AutoencoderKL.from_pretrained(str(folder)), json.loads((folder / "stats.json").read_text())
        return _train_vae(folder, cache, recipe, progress)


def _train_vae(folder: Path, cache: Path, recipe: dict, progress: bool):
    from diffusers import AutoencoderKL

    torch.manual_seed(recipe["seed"])
    vae = AutoencoderKL.from_config(toy_config("vae"))
    train_images = vae_images(recipe, "train", recipe["vae_images"])
    held_out = vae_images(recipe, "test", 192)
    checkpoint = cache / f".{folder.name}.checkpoint.pt"  # an interrupted VAE resumes from here
    stats = train_vae(vae, train_images, recipe["vae_steps"], recipe["vae_batch"], recipe["vae_lr"],
                      recipe["vae_crop"], seed=recipe["seed"], progress=progress, checkpoint=checkpoint)
    shift, scale = set_latent_normalisation(vae, train_images[:512])
    stats.update(reconstruction_error(vae, held_out), shift_factor=shift, scaling_factor=scale)
    log.info("toy VAE: %.1f s, held-out PSNR %.2f dB, max error %d levels", stats["seconds"], stats["psnr"],
             stats["max_abs"])
    tmp = cache / f".{folder.name}.tmp-{os.getpid()}"
    vae.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    checkpoint.unlink(missing_ok=True)
    return vae, stats


def build_folder(work: Path, cache: Path, recipe: dict, progress: bool) -> dict:
    """Random toy components + the trained VAE, saved to ``work`` (a loadable Kontext folder)."""

    parts = build_components(vocabulary(), recipe["seed"], recipe["qk_norm_init"])
    parts["vae"], stats = trained_vae(cache, recipe, progress)
    settings = {"name": "DualShapes toy base", "max_sequence_length": TOY_MAX_SEQUENCE_LENGTH,
                "sampling": {"guidance": recipe["guidance"], "shift": None, "num_steps": recipe["sample_steps"]},
                "train": {"guidance": recipe["guidance"]}, "recipe": recipe, "vae": stats, "complete": False}
    save_folder(work, parts, settings)
    return settings


def pretrain_config(work: Path, world: Path, recipe: dict, progress: bool):
    """The trainer config of the pretraining: full-parameter flow matching on single_edit."""

    cfg = SFTConfig()
    cfg.model.path = str(work)
    cfg.data.manifest = str(world / "manifest.jsonl")
    cfg.data.batch_size = recipe["base_batch"]
    cfg.data.val_split = "test"  # the toy world's generated test split, as the base was built (not held-out train)
    cfg.train.mode, cfg.train.max_steps, cfg.train.seed = "full", recipe["base_steps"], recipe["seed"]
    cfg.train.edit_weight = recipe["base_edit_weight"]
    cfg.train.sigma_sampling, cfg.train.sigma_shift = recipe["base_sigma_sampling"], recipe["base_sigma_shift"]
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule = recipe["base_lr"], 20, "cosine"
    cfg.run.out_dir = str(work / "pretrain")
    cfg.run.checkpoint_every, cfg.run.keep_checkpoints = 100, 1
    cfg.run.val_every, cfg.run.val_samples, cfg.run.val_loss_samples = 0, 8, 64
    cfg.run.log_every, cfg.run.progress = 10, progress
    return cfg


def pretrain(work: Path, world: Path, recipe: dict, progress: bool):
    """Pretrain the base in ``work`` with the project's one trainer (resumable)."""

    return train(pretrain_config(work, world, recipe, progress), resume="auto")


def toy_base(cache_dir=None, *, progress: bool = True, force: bool = False, **overrides) -> Path:
    """Path of the pretrained toy base folder; builds it on first use. ``overrides`` change the recipe
    (e.g. ``base_steps=20`` for a quick smoke build) and so the folder."""

    unknown = set(overrides) - set(DEFAULT_RECIPE)
    if unknown:
        raise ValueError(f"unknown toy recipe key(s) {sorted(unknown)}; known: {sorted(DEFAULT_RECIPE)}")
    recipe = {**DEFAULT_RECIPE, **overrides}
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = recipe_key(recipe)
    final = cache / f"toy-base-{key}"
    if not force and _complete(final):
        return final
    with _lock(cache / f".toy-base-{key}.lock"):
        if force:
            shutil.rmtree(final, ignore_errors=True)
        if _complete(final):  # another process built it while we waited
            return final
        if not force and shipped_key() == key:
            return unpack_shipped(final)
        start = time.perf_counter()
        work = cache / f".toy-base-{key}.work"
        world = cache / f"toy-world-single-s{recipe['seed']}-{recipe['size']}px-{recipe['single_train']}-{recipe['single_test']}"
        single_world({"recipe": recipe, "world": str(world)}, progress)
        if not (work / "dualref.json").is_file():
            shutil.rmtree(work, ignore_errors=True)
            build_folder(work, cache, recipe, progress)
        settings = json.loads((work / "dualref.json").read_text())
        result = pretrain(work, world, recipe, progress)
        shutil.rmtree(work / "transformer")
        shutil.move(str(result.transformer_dir), str(work / "transformer"))
        shutil.rmtree(work / "pretrain" / "checkpoints", ignore_errors=True)
        bundle = load_kontext(work)
        settings.update(complete=True, fingerprint=bundle.fingerprint("transformer"),
                        base_fingerprint=bundle.base_fingerprint(), world=str(world),
                        pretrain={"steps": result.step, "final_loss": result.loss, "val_loss": result.val_loss},
                        build_seconds=round(time.perf_counter() - start, 1))
        (work / "dualref.json").write_text(json.dumps(settings, indent=1, sort_keys=True))
        os.replace(work, final)
        log.info("toy base ready at %s (%.0f s)", final, settings["build_seconds"])
    return final


def shipped_key(folder: Path | None = None) -> str | None:
    """The recipe key the shipped base was built with (None when there is none)."""
    try:
        return json.loads(((folder or SHIPPED) / "dualref.json").read_text())["recipe_key"]
    except (OSError, ValueError, KeyError):
        return None


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.safetensors") if p.relative_to(folder).parts[0] != "pretrain")


def _recast(src: Path, dst: Path, dtype: torch.dtype) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, str(dst), metadata)


def unpack_shipped(final: Path, source: Path | None = None) -> Path:
    """The shipped base as a loadable folder ``final``: its files copied, the weights cast back to fp32
    (the dtype the toy runs in, so the folder is what a build would give, up to fp16 rounding)."""
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source or SHIPPED, tmp, ignore=shutil.ignore_patterns("__pycache__"))
    for path in _weight_files(tmp):
        _recast(path, path, torch.float32)
    settings = json.loads((tmp / "dualref.json").read_text())
    # the single_edit world the base was pretrained on, regenerated here when a tool asks for it
    settings["world"] = str(final.parent / settings["world"])
    (tmp / "dualref.json").write_text(json.dumps(settings, indent=1, sort_keys=True))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    log.info("toy base: unpacked the shipped weights (recipe %s) into %s", settings["recipe_key"], final)
    return final


def ship(folder: Path, target: Path | None = None) -> Path:
    """Write the built base ``folder`` as the shipped files: configs, tokenizers, weights in
    ``SHIPPED_DTYPE``; the fingerprints recorded are those of the folder :func:`unpack_shipped` makes."""
    import tempfile

    target = target or SHIPPED
    settings = json.loads((folder / "dualref.json").read_text())
    if not settings.get("complete"):
        raise ValueError(f"{folder} is not a finished toy base")
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns("pretrain", "__pycache__"))
    for path in _weight_files(tmp):
        _recast(path, path, SHIPPED_DTYPE)
    recipe = settings["recipe"]
    settings.update(recipe_key=recipe_key(recipe), shipped_dtype=str(SHIPPED_DTYPE).removeprefix("torch."),
                    world=Path(settings["world"]).name)
    (tmp / "dualref.json").write_text(json.dumps(settings, indent=1, sort_keys=True))
    with tempfile.TemporaryDirectory() as scratch:  # the fingerprints of what users will load
        bundle = load_kontext(unpack_shipped(Path(scratch) / "base", tmp))
        settings.update(fingerprint=bundle.fingerprint("transformer"), base_fingerprint=bundle.base_fingerprint())
    (tmp / "dualref.json").write_text(json.dumps(settings, indent=1, sort_keys=True))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def single_world(info: dict, progress: bool = True) -> Path:
    """The manifest of the single_edit world the base was pretrained on (generated when missing)."""
    recipe, world = info["recipe"], Path(info["world"])
    generate_world(world, recipe["seed"], train=0, test=0, single_train=recipe["single_train"],
                   single_test=recipe["single_test"], size=recipe["size"], tasks=("single_edit",),
                   progress=progress)
    return world / "manifest.jsonl"


def resolve_model_path(path, cache_dir=None, **recipe):
    """``model.path`` as the jobs load it: ``"toy"`` becomes the toy base's folder (built on first use);
    anything else is returned unchanged. The entry points call this, so the loader never knows the toy."""
    return str(toy_base(cache_dir, **recipe)) if path == "toy" else path


def _complete(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / "dualref.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.toy.base", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None, help="default: $DUALREF_CACHE or ~/.cache/dualref")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = toy_base(args.cache_dir, force=args.force)
    info = json.loads((path / "dualref.json").read_text())
    print(f"toy base: {path}")
    print(f"  VAE: PSNR {info['vae']['psnr']:.2f} dB, max error {info['vae']['max_abs']:.0f}/255, "
          f"trained {info['vae']['seconds']:.0f} s")
    print(f"  base: {info['pretrain']['steps']} steps, loss {info['pretrain']['final_loss']:.4f}, "
          f"held-out loss {info['pretrain']['val_loss']:.4f}; built in {info['build_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
