"""``python -m training.toy.probe``: one-step predictions at fixed noise levels, on a seconds-sized toy base."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.toy import probe as toy_probe

QUICK = dict(single_train=8, single_test=6, vae_images=16, vae_steps=2, base_steps=2, base_batch=4, progress=False)


@pytest.fixture(scope="module")
def quick_base(tmp_path_factory):
    from training.toy.base import toy_base

    path = toy_base(tmp_path_factory.mktemp("probe-cache"), **QUICK)
    return path, Path(json.loads((path / "dualref.json").read_text())["world"]) / "manifest.jsonl"


def test_prediction_is_the_target_at_sigma_0_and_reads_the_instruction(quick_base):
    from training.evaluation import cached_split
    from training.flow import FlowMatchingModel
    from training.models import load_kontext

    path, manifest = quick_base
    bundle = load_kontext(path)
    entries, dataset = cached_split(bundle, manifest, require_target=True, progress=False)
    batch = dataset.batch(range(len(entries)))
    model = FlowMatchingModel(bundle.transformer)
    noise = torch.randn(batch.target.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(toy_probe.one_step_prediction(model, batch, 0.0, noise), batch.target)
    own = toy_probe.one_step_prediction(model, batch, 1.0, noise)
    rolled = toy_probe.one_step_prediction(model, batch, 1.0, noise, shuffled=True)
    assert not torch.equal(own, rolled)  # another sample's instruction, another prediction
    # rolling by one gives sample i sample i-1's instruction: equal to predicting with rolled embeddings
    batch.prompt_embeds, batch.pooled = batch.prompt_embeds.roll(1, 0), batch.pooled.roll(1, 0)
    assert torch.equal(toy_probe.one_step_prediction(model, batch, 1.0, noise), rolled)


def test_cli_prints_one_row_per_sigma_and_instruction(quick_base, capsys):
    path, manifest = quick_base
    assert toy_probe.main(["--model", str(path), "--manifest", str(manifest), "--sigmas", "1", "0",
                           "--shuffled", "1", "--limit", "6"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith("| ") and not line.startswith("| sigma")]
    assert [r.split(" | ")[:2] for r in rows] == [["| 1", "own"], ["| 1", "shuffled"], ["| 0", "own"]]
    result = toy_probe.probe(path, manifest, sigmas=(0.0,), shuffled=(), limit=6)
    assert sum(group["n"] for group in result[(0.0, False)].values()) == 6
    assert set(result[(0.0, False)]) <= {"recolour", "move", "add", "remove"}
    with pytest.raises(SystemExit):
        toy_probe.main(["--model", str(path), "--sigmas", "1.5"])


def test_a_manifest_without_plans_is_refused_by_name(quick_base, tmp_path, capsys):
    path, manifest = quick_base
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for line in lines:
        line["plan"] = None
        line["images"] = [str(manifest.parent / p) for p in line["images"]]
        line["target"] = str(manifest.parent / line["target"]) if line.get("target") else None
    planless = tmp_path / "planless.jsonl"
    planless.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert toy_probe.main(["--model", str(path), "--manifest", str(planless)]) == 2
    err = capsys.readouterr().err
    assert str(planless) in err and "DualShapes plan" in err


def test_grid_shows_image_1_the_target_and_each_prediction(quick_base, tmp_path):
    import numpy as np
    from PIL import Image

    path, manifest = quick_base
    grid = tmp_path / "grid.png"
    result = toy_probe.probe(path, manifest, sigmas=(1.0, 0.0), shuffled=(1.0,), limit=6, grid=grid,
                             grid_per_group=1)
    groups = sorted(result[(0.0, False)])
    image = np.asarray(Image.open(grid).convert("RGB"))
    tile, pad, head, left = 128, 4, 14, 64  # 64 px samples enlarged twice
    assert image.shape == (head + len(groups) * (tile + pad), left + 5 * (tile + pad), 3)  # image 1, target, 3 runs
    # row 0: the first test sample of the first group (alphabetically), tiles enlarged without smoothing
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    first = next(e for e in [e for e in lines if e["split"] == "test"][:6] if e["plan"]["roles"]["op"] == groups[0])

    def tile_at(column):
        x = left + column * (tile + pad)
        return image[head:head + tile:2, x:x + tile:2]

    for column, file in ((0, first["images"][0]), (1, first["target"])):
        assert np.array_equal(tile_at(column), np.asarray(Image.open(manifest.parent / file).convert("RGB")))
    assert not np.array_equal(tile_at(2), tile_at(3))  # sigma 1 and sigma 0 predictions are different tiles
