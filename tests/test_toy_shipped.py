"""The toy base ships with the pack (issue 21): the shipped files are the current recipe's, unpack to a
folder whose fingerprints they record, and ``--rebuild-base`` writes them anew from the recipe."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.toy import base as toy_base_module
from training.toy.base import DEFAULT_RECIPE, SHIPPED, recipe_key, ship, shipped_key, toy_base, unpack_shipped

QUICK = dict(single_train=8, single_test=6, vae_images=16, vae_steps=2, base_steps=2, base_batch=4)


def _weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.relative_to(folder)): load_file(p) for p in sorted(folder.rglob("*.safetensors"))
            if p.relative_to(folder).parts[0] != "pretrain"}


def test_shipped_base_is_the_current_recipes_and_small():
    """A recipe change (a value, RECIPE_VERSION, WORLD_VERSION, a toy config) changes the key: this test
    then fails until ``python -m training.toy --rebuild-base`` writes the weights anew."""
    assert shipped_key() == recipe_key(DEFAULT_RECIPE), (
        "training/toy/weights/ holds another recipe's base: run python -m training.toy --rebuild-base and commit it")
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 8 * 1024 * 1024
    weights = _weights(SHIPPED)
    assert set(weights) == {f"{part}/{name}" for part, name in [
        ("transformer", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"), ("text_encoder_2", "model.safetensors")]}
    assert {t.dtype for w in weights.values() for t in w.values() if t.is_floating_point()} == {torch.float16}


def test_default_base_unpacks_from_the_shipped_files_without_a_build(tmp_path, monkeypatch):
    from training.models import load_kontext

    def no_build(*args, **kwargs):
        raise AssertionError("the default base must come from the shipped files, not a build")

    monkeypatch.setattr(toy_base_module, "pretrain", no_build)
    folder = toy_base(tmp_path, progress=False)
    assert folder.name == f"toy-base-{recipe_key(DEFAULT_RECIPE)}"
    info = json.loads((folder / "dualref.json").read_text())
    shipped = json.loads((SHIPPED / "dualref.json").read_text())
    bundle = load_kontext(folder)
    assert bundle.fingerprint("transformer") == shipped["fingerprint"] == info["fingerprint"]
    assert bundle.base_fingerprint() == shipped["base_fingerprint"]
    # lossless: the unpacked fp32 weights are the shipped fp16 ones, exactly
    unpacked, packed = _weights(folder), _weights(SHIPPED)
    for name, tensors in packed.items():
        for key, value in tensors.items():
            assert unpacked[name][key].dtype == torch.float32
            assert torch.equal(unpacked[name][key], value.float()), (name, key)
    assert Path(info["world"]).parent == tmp_path  # the single_edit world is made here when a tool needs it


def test_ship_then_unpack_is_the_build_rounded_to_half(tmp_path):
    """The round trip on a seconds-long build: every weight is the build's, rounded to fp16 once."""
    from training.models import load_kontext

    built = toy_base(tmp_path / "cache", progress=False, **QUICK)
    shipped = ship(built, tmp_path / "weights")
    info = json.loads((shipped / "dualref.json").read_text())
    assert info["recipe_key"] == recipe_key({**DEFAULT_RECIPE, **QUICK}) and info["shipped_dtype"] == "float16"
    assert not (shipped / "pretrain").exists()
    unpacked = unpack_shipped(tmp_path / "other" / "base", shipped)
    original, back = _weights(built), _weights(unpacked)
    assert original.keys() == back.keys()
    for name, tensors in original.items():
        for key, value in tensors.items():
            assert torch.equal(back[name][key], value.half().float()), (name, key)
    assert load_kontext(unpacked).fingerprint("transformer") == info["fingerprint"]


def test_rebuild_base_refuses_a_recipe_override(tmp_path, capsys):
    from training.toy.__main__ import main

    assert main(["--rebuild-base", "--recipe", "base_steps=2", "--out", str(tmp_path), "-q"]) == 2
    assert "--rebuild-base" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before the world or a base was made


def test_rebuild_base_writes_the_shipped_files_that_a_fresh_cache_then_unpacks(tmp_path, monkeypatch):
    """The CLI end to end, with a seconds-long recipe standing in for the default one."""
    from training.toy.__main__ import main

    monkeypatch.setattr(toy_base_module, "DEFAULT_RECIPE", {**DEFAULT_RECIPE, **QUICK})
    monkeypatch.setattr(toy_base_module, "SHIPPED", tmp_path / "weights")
    small = ["--train", "2", "--test", "1", "--layouts", "diagonal", "-q"]
    assert main(["--rebuild-base", "--out", str(tmp_path / "a"), "--cache-dir", str(tmp_path / "c1")] + small) == 0
    assert shipped_key(tmp_path / "weights") == recipe_key({**DEFAULT_RECIPE, **QUICK})

    def no_build(*args, **kwargs):
        raise AssertionError("a fresh cache must unpack the shipped files")

    monkeypatch.setattr(toy_base_module, "pretrain", no_build)
    assert main(["--out", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "c2")] + small) == 0
    info = json.loads(next((tmp_path / "c2").glob("toy-base-*/dualref.json")).read_text())
    assert info["fingerprint"] == json.loads((tmp_path / "weights" / "dualref.json").read_text())["fingerprint"]
