"""Manifest checks, aspect-ratio buckets and the latent/text cache (issue 4 part 1)."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sft_helpers import micro_model, micro_world, write_lines
from training.cache import CachedDataset, EmbeddingCache, prepare_cache
from training.data import (BadManifestError, BucketBatches, bucket_size, bucket_sizes, load_manifest, pixel_budget,
                           read_manifest, write_skipped)
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
    rows[1]["images"] = [rows[1]["images"][0], str(world / "missing.png")]  # a dual task takes 2-3 images
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


def test_buckets_are_a_fixed_list_around_the_pixel_budget():
    sizes = bucket_sizes(512 * 512, 16)
    assert len(sizes) == 9 and (512, 512) in sizes
    for h, w in sizes:
        assert h % 16 == 0 and w % 16 == 0 and 0.9 * 512 * 512 <= h * w <= 512 * 512
    assert bucket_size(64, 64, 4096, 8) == (64, 64)  # the toy world's square images: unchanged
    assert bucket_size(64, 64, 512 * 512, 8) == (64, 64)  # a small image is never scaled up
    assert pixel_budget(48, 64, 4096) == 2896 and pixel_budget(2000, 2000, 4096) == 4096
    h, w = bucket_size(1000, 1500, 512 * 512, 16)
    assert (h, w) == (416, 624) and abs(w / h - 1.5) < 0.01
    assert bucket_size(1500, 1000, 512 * 512, 16) == (624, 416)  # portrait stays portrait
    assert bucket_size(1000, 4000, 512 * 512, 16) == max(sizes, key=lambda s: s[1] / s[0])  # beyond 2:1: the widest


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
    # 48x64 (3072 px, under the 4096 budget: never upscaled) goes to the nearest bucket at 2896 px
    # (48x56: 12x14 latents), cropped, not stretched
    assert shapes[0] == ((16, 16), (16, 16), (16, 16)) and shapes[1] == ((16, 16), (16, 16), (12, 14))
    assert shapes[3] == ((16, 16), (16, 16), (14, 12))  # a portrait reference stays portrait
    dataset = CachedDataset(entries, cache)
    batch = dataset.batch([1, 4])
    assert batch.refs[1].shape == (2, 16, 12, 14)
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


def _diverse_dims(n, seed, independent_ref2):
    """(target, ref1, ref2) pixel sizes with aspect ratios log-uniform over [0.5, 2]; the target shares
    ref1's (an edit of it); ref2 its own, or also ref1's."""
    rng = np.random.default_rng(seed)
    a = np.exp(rng.uniform(np.log(0.5), np.log(2), n))
    b = np.exp(rng.uniform(np.log(0.5), np.log(2), n)) if independent_ref2 else a
    return [[(1000, int(round(1000 * x)))] * 2 + [(1000, int(round(1000 * y)))] for x, y in zip(a, b)]


@pytest.mark.parametrize("independent_ref2", [False, True])
def test_a_diverse_aspect_manifest_uses_95_percent_per_epoch_on_8_ranks(independent_ref2, caplog):
    """2,000 samples at 512x512, global batch 64 = 8 ranks x 8: the bucketing code alone (no encoding).
    Before: exact shapes, a batch per bucket -> 26 % used (issue 17)."""
    from training.data import assign_buckets

    dims = _diverse_dims(2000, 0, independent_ref2)
    keys = assign_buckets(dims, 512 * 512, 16, share=8)
    assert len({s for k in keys for s in k}) <= 9  # the fixed list
    batches = BucketBatches(keys, 64, seed=0, processes=8)
    used, total = batches.usage()
    assert total == 2000 and used >= 0.95 * total, batches.describe()
    epoch = batches.epoch(0)
    assert sum(map(len, epoch)) == used and len({i for b in epoch for i in b}) == used  # each used once
    for batch in epoch:  # every rank's share is one shape (stackable); ranks may differ
        assert all(len({keys[i] for i in batch[r * 8:(r + 1) * 8]}) == 1 for r in range(8))
    assert f"each epoch uses {used} of 2000 samples" in batches.describe()
    one_rank = BucketBatches(assign_buckets(dims, 512 * 512, 16), 64, seed=0)  # the whole batch one shape
    assert one_rank.usage()[0] < used
    for sample, key in zip(dims, keys):  # a moved image went to its next-nearest bucket at most
        for (h, w), (bh, bw) in zip(sample, key):
            assert abs(np.log(bw / bh) - np.log(w / h)) < np.log(16 / 9) - np.log(3 / 2) + np.log(1.2)


def test_images_are_resized_to_cover_their_bucket_and_centre_cropped(tmp_path):
    """A 3:1 gradient image into the widest bucket of 4096 px (40x88): one scale on both axes (no
    stretch), the centre kept; a square image at its bucket's size comes back untouched."""
    from training.data import load_pixels

    h, w = 100, 300
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    image = np.stack([xs / (w - 1) * 255, ys / (h - 1) * 255, np.zeros_like(xs)], -1).round().astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "wide.png")
    size = bucket_size(h, w, 4096, 8)
    assert size == (40, 88)
    out = (load_pixels(tmp_path / "wide.png", size) + 1) * 127.5
    assert out.shape == (3, 40, 88)
    inner = out[:, 4:-4, 4:-4]
    slope_x = (inner[0, :, -1] - inner[0, :, 0]).mean() / (inner.shape[2] - 1)  # red levels per output column
    slope_y = (inner[1, -1, :] - inner[1, 0, :]).mean() / (inner.shape[1] - 1)  # green levels per output row
    scale_x, scale_y = 255 / ((w - 1) * slope_x), 255 / ((h - 1) * slope_y)  # output pixels per source pixel
    assert abs(scale_x - 0.4) < 0.01 and abs(scale_y - 0.4) < 0.01  # 100 -> 40 rows: 0.4 both ways
    assert abs(out[0, :, 43:45].mean() - 127.5) < 2  # the centre column stays in the centre
    square = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(square).save(tmp_path / "square.png")
    assert torch.equal(load_pixels(tmp_path / "square.png", (64, 64)),
                       torch.from_numpy(square.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0)


def test_validation_holds_out_a_slice_of_the_training_split():
    from training.config import SFTConfig
    from training.data import hold_out

    assert SFTConfig().data.val_split == "train"  # never the benchmark's test split by default
    records = list(range(100))
    train, held = hold_out(records, 32)
    assert len(held) == 10 and not set(train) & set(held) and sorted(train + held) == records  # at most a tenth
    assert held == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]  # spread: every task of a sorted manifest
    assert hold_out(records, 5)[1] == [0, 20, 40, 60, 80] and hold_out(records[:9], 32) == (records[:9], [])


def test_processes_share_the_encoding_and_each_reads_the_whole_cache(world, bundle, tmp_path):
    """prepare_cache(part=(rank, processes)): the shares are disjoint and cover what was missing, so
    after them every process's reading pass is all cache hits (no rank waits on another)."""
    records = load_manifest(world / "manifest.jsonl", split="train")
    alone = prepare_cache(records, bundle, EmbeddingCache.for_bundle(tmp_path / "alone", bundle), max_pixels=64 * 64,
                          batch_size=4, progress=False)[1]
    cache = EmbeddingCache.for_bundle(tmp_path / "shared", bundle)
    shares = [prepare_cache(records, bundle, cache, max_pixels=64 * 64, batch_size=4, progress=False,
                            part=(rank, 2))[1] for rank in range(2)]
    assert all(s.images_computed > 0 for s in shares)  # both processes worked
    assert sum(s.images_computed for s in shares) == alone.images_computed  # nothing encoded twice
    assert sum(s.texts_computed for s in shares) == alone.texts_computed
    entries, read = prepare_cache(records, bundle, cache, max_pixels=64 * 64, batch_size=4, progress=False)
    assert read.images_computed == 0 and read.texts_computed == 0 and len(entries) == len(records)
