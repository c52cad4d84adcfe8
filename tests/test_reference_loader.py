"""DualReferenceLoader.execute with real ComfyUI modules and a small VAE built from ComfyUI's classes."""
import importlib

import pytest
import torch

from comfy_models import build_vae

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def loader(pack):
    return importlib.import_module(pack.__name__ + ".nodes.reference_loader")


@pytest.fixture(scope="module")
def vae(comfy_host):
    return build_vae(seed=4)


def images(batch, h, w, seed):
    return torch.rand(batch, h, w, 3, generator=torch.Generator().manual_seed(seed))


def run(loader, vae, image_1, image_2, conditioning=None, **options):
    conditioning = conditioning or [[torch.zeros(1, 4, 8), {"pooled_output": torch.zeros(1, 8)}]]
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return loader.DualReferenceLoader.execute(conditioning, vae, image_1, image_2, **options).result


def test_budget_keeps_aspect_and_multiples_of_16(loader):
    assert loader.budget_size(600, 800, 1.0) == (880, 1184)  # 1 MP = 1024 x 1024, as ComfyUI counts
    assert loader.budget_size(1024, 1024, 1.0) == (1024, 1024)
    assert loader.budget_size(37, 70, 0.0) == (32, 64)  # 0 keeps the size, snapped to 16
    assert loader.budget_size(40, 56, 0.0) == (48, 64)  # halves round up
    for h, w, mp in [(300, 1200, 0.5), (1200, 300, 2.0), (512, 777, 0.25)]:
        bh, bw = loader.budget_size(h, w, mp)
        assert bh % 16 == 0 and bw % 16 == 0
        assert abs(bh / bw - h / w) / (h / w) < 0.05
        assert abs(bh * bw - mp * 1024 * 1024) / (mp * 1024 * 1024) < 0.05


def test_fit_never_stretches(loader):
    wide = images(1, 30, 50, seed=1)
    padded = loader.fit_to_box(wide, 32, 48, crop=False)
    assert padded.shape == (1, 32, 48, 3)
    # uniform scale 48/50 -> 29 rows of picture, the rest repeats the top/bottom edge rows
    assert torch.equal(padded[:, 0], padded[:, 1]) and torch.equal(padded[:, -1], padded[:, -2])
    cropped = loader.fit_to_box(wide, 32, 48, crop=True)
    assert cropped.shape == (1, 32, 48, 3)
    assert not torch.equal(cropped[:, 0], cropped[:, 1])  # covered, nothing repeated
    same = images(2, 32, 48, seed=2)
    assert torch.equal(loader.fit_to_box(same, 32, 48, crop=False), same)  # already fits: untouched


def test_conditioning_carries_both_references_in_order(loader, vae):
    first, second = images(1, 40, 56, seed=3), images(1, 56, 40, seed=4)  # snap to 48x64, 64x48
    earlier = torch.ones(1, 16, 2, 2)
    conditioning = [[torch.zeros(1, 4, 8), {"pooled_output": torch.zeros(1, 8), "reference_latents": [earlier]}]]
    out, latent, _ = run(loader, vae, first, second, conditioning, megapixels=0.0)
    refs = out[0][1]["reference_latents"]
    assert len(refs) == 3 and refs[0] is earlier  # appended after what was there, like ReferenceLatent
    with torch.inference_mode():
        expected = [vae.encode(loader.fit_to_box(img, *loader.budget_size(*img.shape[1:3], 0.0), False))
                    for img in (first, second)]
    assert torch.equal(refs[1], expected[0]) and torch.equal(refs[2], expected[1])
    assert refs[1].shape == (1, 16, 6, 8) and refs[2].shape == (1, 16, 8, 6)
    assert conditioning[0][1]["reference_latents"] == [earlier]  # the input is not modified
    assert out[0][1]["pooled_output"] is conditioning[0][1]["pooled_output"]
    assert latent["samples"].shape == refs[1].shape and not latent["samples"].any()


def test_canvas_choices(loader, vae):
    first, second = images(1, 32, 64, seed=5), images(2, 64, 32, seed=6)
    options = dict(megapixels=0.0)
    _, latent, _ = run(loader, vae, first, second, canvas="reference 2", **options)
    assert latent["samples"].shape == (2, 16, 8, 4)  # batch of the larger image batch
    _, latent, _ = run(loader, vae, first, second, canvas="custom", width=100, height=40, **options)
    assert latent["samples"].shape == (2, 16, 6, 12)  # 96 x 48 px after snapping to 16


def test_pixel_budget_scales_each_reference(loader, vae):
    out, _, _ = run(loader, vae, images(1, 64, 128, seed=7), images(1, 128, 128, seed=8), megapixels=0.002)
    r1, r2 = out[0][1]["reference_latents"]
    assert r1.shape[-2:] == (4, 8) and r2.shape[-2:] == (6, 6)  # 32x64 px and 48x48 px, aspect kept


def test_bad_inputs_are_named(loader, vae):
    good = images(1, 32, 32, seed=9)
    with pytest.raises(ValueError, match="image_1 is empty"):
        run(loader, vae, torch.zeros(0, 32, 32, 3), good)
    with pytest.raises(ValueError, match="image_2 is empty"):
        run(loader, vae, good, None)
    with pytest.raises(ValueError, match="batch of 2 and image_2 a batch of 3"):
        run(loader, vae, images(2, 32, 32, 1), images(3, 32, 32, 2))
    with pytest.raises(ValueError, match="needs a VAE"):
        run(loader, None, good, good)


def test_report_gives_sizes_and_image_tokens(loader, vae):
    """Why a dual-reference run is slow: two references + the canvas, in pixels and tokens."""
    _, latent, report = run(loader, vae, images(1, 64, 128, seed=7), images(1, 96, 96, seed=8), megapixels=0.0,
                            canvas="custom", width=64, height=64)
    lines = report.splitlines()
    assert lines[0] == "reference 1: 128x64 px, 32 tokens"  # 16x8 latent -> 8x4 tokens of 2x2 patches
    assert lines[1] == "reference 2: 96x96 px, 36 tokens"
    assert lines[2] == "output canvas: 64x64 px, 16 tokens"
    assert lines[3].startswith("image tokens per step: 84 (5.2x a plain Flux image")


def test_one_megapixel_everywhere_is_three_times_plain_flux(loader):
    """The README's figure: two 1 MP references + a 1 MP canvas = 3 x 4096 = 12288 image tokens."""
    one_mp = torch.zeros(1, 16, 128, 128)  # 1024x1024 px at the FLUX VAE's 8x
    report = loader.size_report([one_mp, one_mp], one_mp, 8)
    assert "reference 1: 1024x1024 px, 4096 tokens" in report
    assert "image tokens per step: 12288 (3.0x a plain Flux image" in report


def test_optional_third_image_appends_a_third_reference(loader, vae):
    """Issue 19: image_3 (optional) adds reference 3 after the other two; left out, the node is as before."""
    first, second, third = images(1, 40, 56, seed=3), images(1, 56, 40, seed=4), images(1, 32, 48, seed=5)
    two, latent_two, report_two = run(loader, vae, first, second, megapixels=0.0)
    same, latent_same, report_same = run(loader, vae, first, second, megapixels=0.0, image_3=None)
    assert all(torch.equal(a, b) for a, b in zip(two[0][1]["reference_latents"], same[0][1]["reference_latents"]))
    assert report_two == report_same and torch.equal(latent_two["samples"], latent_same["samples"])
    out, latent, report = run(loader, vae, first, second, megapixels=0.0, image_3=third, canvas="reference 3")
    refs = out[0][1]["reference_latents"]
    assert len(refs) == 3 and [tuple(r.shape[-2:]) for r in refs] == [(6, 8), (8, 6), (4, 6)]
    assert all(torch.equal(a, b) for a, b in zip(refs[:2], two[0][1]["reference_latents"]))
    with torch.inference_mode():
        assert torch.equal(refs[2], vae.encode(loader.fit_to_box(third, 32, 48, False)))
    assert latent["samples"].shape == refs[2].shape  # canvas: reference 3
    assert report.splitlines()[2] == "reference 3: 48x32 px, 6 tokens"
    with pytest.raises(ValueError, match="canvas is 'reference 3' but only 2 images are connected"):
        run(loader, vae, first, second, canvas="reference 3")
    with pytest.raises(ValueError, match="image_3 has a batch of 2 and image_1 a batch of 3"):
        run(loader, vae, images(3, 32, 32, 1), images(1, 32, 32, 2), image_3=images(2, 32, 32, 3))
    with pytest.raises(ValueError, match="image_3 is empty"):
        run(loader, vae, first, second, image_3=torch.zeros(0, 32, 32, 3))
