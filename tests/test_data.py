"""Manifest checks, aspect-ratio buckets and the latent/text cache (issue 4 part 1)."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sft_helpers import micro_model, micro_world, write_lines
from training.cache import CachedDataset, EmbeddingCache, prepare_cache
from training.data import BadManifestError, BucketBatches, fit_size, load_manifest, read_manifest, write_skipped
from training.models import load_kontext


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    micro_world(root, tasks=("animal_scene", "single_edit"), train=6, test=2)
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_kontext(micro_model(tmp_path_factory.mktemp("micro")))


def _lines(world):
    return [json.loads(x) for x in (world / "manifest.jsonl").read_text().splitlines()]


def test_good_manifest_loads_every_line(world):
    report = read_manifest(world / "manifest.jsonl", split=None)
    assert not report.bad
    assert len(report.records) == report.total == 16
    assert all(r.target.is_file() and all(p.is_file() for p in r.refs) for r in report.records)


def test_corrupt_line_and_missing_image_are_named_by_line(world, tmp_path):
    lines = _lines(world)
    good = [dict(x, images=[f"{world}/{p}" for p in x["images"]], target=f"{world}/{x['target']}") for x in lines[:4]]
    missing = dict(good[1], id="gone", images=[good[1]["images"][0], str(world / "images/nope.png")])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    unreadable = dict(good[2], id="bad-bytes", target=str(tmp_path / "broken.png"))
    no_target = dict(good[3], id="no-target", target=None)
    manifest = write_lines(tmp_path / "m.jsonl", [good[0], '{"id": "x", "task": "animal_scene", "images": [',
                                                  missing, unreadable, no_target,
                                                  dict(good[0], id="t", task="dog_walking")])
    with pytest.raises(BadManifestError) as err:
        load_manifest(manifest)
    text = str(err.value)
    assert "5 of 6 lines are bad" in text and "--skip-bad" in text
    assert "line 2: not valid JSON" in text
    assert "line 3: images[1]" in text and "nope.png" in text and "not found" in text
    assert "line 4: target" in text and "unreadable image" in text
    assert "line 5: no target image" in text
    assert "line 6: unknown task 'dog_walking'" in text
    assert [b.line_no for b in err.value.bad] == [2, 3, 4, 5, 6]


def test_skip_bad_goes_on_and_lists_what_it_skipped(world, tmp_path):
    lines = _lines(world)
    rows = [dict(x, images=[f"{world}/{p}" for p in x["images"]], target=f"{world}/{x['target']}") for x in lines[:3]]
    rows[1]["images"] = [str(world / "missing.png")]
    manifest = write_lines(tmp_path / "m.jsonl", rows)
    bad = []
    records = load_manifest(manifest, skip_bad=True, skipped=bad)
    assert [r.line_no for r in records] == [1, 3]
    # the run's list: the manifest check's line, and one that failed later (at encoding), with its text
    write_skipped(tmp_path / "run", manifest, bad + [(3, "image x cannot be decoded"), (2, bad[0].reason)])
    skipped = [json.loads(x) for x in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert [s["line"] for s in skipped] == [2, 3] and "missing.png" in skipped[0]["reason"]
    assert skipped[0]["reason"] == bad[0].reason  # the same reason twice is listed once
    assert skipped[1] == {"line": 3, "reason": "image x cannot be decoded", "text": json.dumps(rows[2])}


def test_fit_size_keeps_aspect_ratio_and_multiples():
    assert fit_size(64, 64, 512 * 512, 8) == (64, 64)
    h, w = fit_size(1000, 1500, 512 * 512, 16)
    assert h % 16 == 0 and w % 16 == 0 and h * w <= 512 * 512
    assert abs(w / h - 1.5) < 0.05
    assert fit_size(48, 64, 4096, 8) == (48, 64)


def test_buckets_group_equal_shapes_and_resume_mid_epoch():
    keys = [("a",)] * 10 + [("b",)] * 7 + [("c",)] * 2
    batches = BucketBatches(keys, batch_size=3, seed=1)
    epoch = batches.epoch(0)
    assert len(epoch) == len(batches) == 3 + 2  # remainders wait; bucket c never fills a batch
    for b in epoch:
        assert len({keys[i] for i in b}) == 1 and len(b) == 3
    assert epoch != batches.epoch(1)  # reshuffled per epoch
    stream = batches.iterate()
    first = [next(stream) for _ in range(8)]
    resumed = batches.iterate(first[6][0], first[6][1])
    assert next(resumed) == first[6] and next(resumed) == first[7]


def test_task_repeats_show_a_sample_that_many_times_per_epoch():
    keys = [("a",)] * 8
    repeats = [3, 1, 1, 1, 1, 1, 1, 1]  # sample 0 belongs to a task repeated three times
    batches = BucketBatches(keys, batch_size=2, seed=0, repeats=repeats)
    seen = [i for b in batches.epoch(0) for i in b]
    assert len(batches) == 5 and sorted(seen) == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]


def test_mixed_aspect_references_get_their_own_buckets(tmp_path, bundle):
    rng = np.random.default_rng(0)
    rows = []
    for i, (h2, w2) in enumerate([(64, 64), (48, 64), (64, 64), (64, 48), (48, 64)]):
        names = []
        for k, (h, w) in enumerate([(64, 64), (h2, w2), (64, 64)]):
            name = f"s{i}_{k}.png"
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
            names.append(name)
        rows.append({"id": f"s{i}", "task": "animal_scene", "images": names[:2], "target": names[2],
                     "instruction": "put the object of image 2 at the left of image 1"})
    manifest = write_lines(tmp_path / "m.jsonl", rows)
    records = load_manifest(manifest)
    cache = EmbeddingCache.for_bundle(tmp_path / "cache", bundle)
    entries, _ = prepare_cache(records, bundle, cache, max_pixels=64 * 64, progress=False)
    shapes = [e.shapes for e in entries]
    assert shapes[0] == ((16, 16), (16, 16), (16, 16)) and shapes[1] == ((16, 16), (16, 16), (12, 16))
    assert shapes[3] == ((16, 16), (16, 16), (16, 12))  # a portrait reference stays portrait
    dataset = CachedDataset(entries, cache)
    batch = dataset.batch([1, 4])
    assert batch.refs[1].shape == (2, 16, 12, 16)
    with pytest.raises(ValueError, match="mixes latent shapes"):
        dataset.batch([0, 1])


def test_cache_is_reused_on_rerun_without_loading_encoders(world, bundle, tmp_path):
    records = load_manifest(world / "manifest.jsonl", split="train")
    cache = EmbeddingCache.for_bundle(tmp_path / "cache", bundle)
    entries, first = prepare_cache(records, bundle, cache, max_pixels=64 * 64, progress=False)
    assert first.images_computed == 6 * 3 + 6 * 2 and first.texts_computed == len({r.sample.instruction for r in records})
    stored = {p: p.read_bytes() for p in (tmp_path / "cache").rglob("*.safetensors")}
    fresh = load_kontext(bundle.source.root)  # a new process's bundle: nothing loaded yet
    again, second = prepare_cache(records, fresh, EmbeddingCache.for_bundle(tmp_path / "cache", fresh),
                                  max_pixels=64 * 64, progress=False)
    assert second.all_hits and second.images_cached == first.images_computed
    assert not {"vae", "text_encoder", "text_encoder_2"} & set(fresh._loaded)
    assert {p: p.read_bytes() for p in (tmp_path / "cache").rglob("*.safetensors")} == stored
    a = CachedDataset(entries, cache).batch([0])
    b = CachedDataset(again, cache).batch([0])
    assert torch.equal(a.target, b.target) and torch.equal(a.prompt_embeds, b.prompt_embeds)
    # the cached latent is what the VAE gives for that image (encoded alone here, in a batch of 16
    # there: oneDNN's batched convolutions differ in the last bits, hence a 1e-5 tolerance)
    from training.data import load_pixels
    direct = bundle.encode_images(load_pixels(records[0].target)[None])
    torch.testing.assert_close(direct[0], a.target[0], rtol=1e-5, atol=1e-5)


def test_cache_key_changes_with_the_image_and_the_vae(world, bundle, tmp_path):
    cache = EmbeddingCache.for_bundle(tmp_path / "c", bundle)
    image = sorted((world / "images").glob("*.png"))[0]
    key = cache.image_key(image, (64, 64))
    assert key == cache.image_key(image, (64, 64))
    assert key != cache.image_key(image, (32, 32))
    copy = tmp_path / "copy.png"
    shutil.copy(image, copy)
    assert cache.image_key(copy, (64, 64)) == key  # content, not path
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(copy)
    assert cache.image_key(copy, (64, 64)) != key
    other = EmbeddingCache(tmp_path / "c", "another-vae", bundle.fingerprint("text"))
    assert other.image_key(image, (64, 64)) != key
    assert other.text_key("a") == cache.text_key("a")


def test_interrupted_caching_resumes(world, bundle, tmp_path):
    records = load_manifest(world / "manifest.jsonl", split="train")
    cache = EmbeddingCache.for_bundle(tmp_path / "cache", bundle)
    prepare_cache(records[:2], bundle, cache, max_pixels=64 * 64, progress=False)  # "interrupted" after 2
    _, stats = prepare_cache(records, bundle, cache, max_pixels=64 * 64, progress=False)
    assert stats.images_cached > 0 and stats.images_computed > 0
    _, stats = prepare_cache(records, bundle, cache, max_pixels=64 * 64, progress=False)
    assert stats.all_hits
