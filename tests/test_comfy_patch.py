"""DiagonalPositionPatch in the real ComfyUI host: ids, losslessness and gates (DESIGN contracts 1-3).

A tiny FLUX.1 built from ComfyUI's own classes with random weights; every run is a real
``comfy.sample.sample`` (what KSampler calls), so conditioning, cond/uncond batching and
the wrapper chain are ComfyUI's.
"""
import contextlib
import importlib
import math

import pytest
import torch

from comfy_models import build_flux, conditioning, flux_unet_config, sample

pytestmark = pytest.mark.host

REF_SETS = {
    "one_square": [(8, 8)],
    "two_nonsquare": [(8, 12), (12, 8)],
    "three_mixed": [(6, 10), (10, 4), (4, 4)],
}


@pytest.fixture(scope="module")
def adapter(pack):
    return importlib.import_module(pack.__name__ + ".dual_rope.comfy_adapter")


@pytest.fixture(scope="module")
def patch_node(pack):
    return importlib.import_module(pack.__name__ + ".nodes.position_patch").DiagonalPositionPatch


@pytest.fixture(scope="module")
def flux(comfy_host):
    return build_flux(seed=1)


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(7)
    context = torch.randn(1, 6, 32, generator=gen)
    pooled = torch.randn(1, 32, generator=gen)
    refs = {name: [torch.randn(1, 16, h, w, generator=gen) for h, w in sizes] for name, sizes in REF_SETS.items()}
    return context, pooled, refs


def skip_unless_host_has(method):
    """Older hosts lack some methods (uxo arrived in ComfyUI 0.3.57): compare only with what exists."""
    import inspect

    import comfy.ldm.flux.model

    native = inspect.getsource(comfy.ldm.flux.model.Flux._forward)
    if method != "offset" and f'"{method}"' not in native:  # offset: the default branch, always there
        pytest.skip(f"this ComfyUI's Flux has no {method!r} reference method to compare with")


def patched(patch_node, model, method="diagonal", strengths=(1.0, 1.0)):
    return patch_node.execute(model, method, *strengths).result[0]


def run(model, inputs, refs, cfg=1.0, steps=2, target=(8, 8), **cond_extra):
    context, pooled, _ = inputs
    positive = conditioning(context, pooled, refs, **cond_extra)
    negative = conditioning(torch.zeros_like(context), pooled, refs, **cond_extra)
    return sample(model, positive, negative, torch.zeros(1, 16, *target), steps=steps, cfg=cfg)


@contextlib.contextmanager
def recorded_image_ids(model):
    """Image ids as ComfyUI feeds them to RoPE: ``pe_embedder`` gets ``cat(txt_ids, img_ids)``."""
    seen = []
    text_tokens = 6

    def record(module, args):
        seen.append(args[0][:, text_tokens:].clone())

    hook = model.model.diffusion_model.pe_embedder.register_forward_pre_hook(record)
    try:
        yield seen
    finally:
        hook.remove()


@pytest.mark.parametrize("method", ["offset", "index", "uxo"])
@pytest.mark.parametrize("ref_set", list(REF_SETS))
def test_ids_match_comfyui_for_its_methods(flux, patch_node, inputs, method, ref_set):
    skip_unless_host_has(method)
    refs = inputs[2][ref_set]
    with recorded_image_ids(flux) as native_ids:
        run(flux, inputs, refs, steps=1, target=(8, 6), reference_latents_method=method)
    with recorded_image_ids(flux) as our_ids:
        run(patched(patch_node, flux, method), inputs, refs, steps=1, target=(8, 6))
    assert len(native_ids) == len(our_ids) == 1
    assert torch.equal(native_ids[0], our_ids[0])


@pytest.mark.parametrize("ref_set", list(REF_SETS))
def test_diagonal_ids_follow_the_layout_and_override_the_conditioning(flux, patch_node, inputs, ref_set):
    from dual_rope import layout, layout_ids, token_grid

    refs = inputs[2][ref_set]
    with recorded_image_ids(flux) as seen:
        run(patched(patch_node, flux, "diagonal"), inputs, refs, steps=1, target=(8, 6),
            reference_latents_method="index")  # ignored: the patch decides
    expected = layout_ids(layout(token_grid((8, 6)), [token_grid(r.shape[-2:]) for r in refs], "diagonal"))
    assert torch.equal(seen[0][0], expected.to(seen[0].dtype))
    if len(refs) == 1:  # one reference: exactly native Kontext
        with recorded_image_ids(flux) as native_ids:
            run(flux, inputs, refs, steps=1, target=(8, 6))
        assert torch.equal(native_ids[0], seen[0])


@pytest.mark.parametrize("cfg", [1.0, 2.0])  # 2.0: cond and uncond (both with references) run as one batch
def test_one_reference_strength_one_is_lossless(flux, patch_node, inputs, cfg):
    refs = inputs[2]["one_square"]
    native = run(flux, inputs, refs, cfg=cfg)
    ours = run(patched(patch_node, flux, "diagonal", (1.0, 1.0)), inputs, refs, cfg=cfg)
    assert torch.equal(native, ours)
    assert torch.equal(native, run(patched(patch_node, flux, "diagonal", (1.0, 1.0, 1.0)), inputs, refs, cfg=cfg))
    no_reference = run(flux, inputs, None, cfg=cfg)
    assert not torch.equal(native, no_reference)  # the reference does matter
    assert torch.equal(run(patched(patch_node, flux, "diagonal", (1.0, 0.5)), inputs, None, cfg=cfg), no_reference)


@pytest.mark.parametrize("method", ["offset", "index", "uxo"])
def test_comfyui_methods_reproduce_native_output(flux, patch_node, inputs, method):
    skip_unless_host_has(method)
    refs = inputs[2]["two_nonsquare"]
    native = run(flux, inputs, refs, cfg=2.0, reference_latents_method=method)
    assert torch.equal(native, run(patched(patch_node, flux, method), inputs, refs, cfg=2.0))


def test_strength_zero_equals_leaving_the_reference_out(flux, patch_node, inputs):
    r1, r2 = inputs[2]["two_nonsquare"]
    without_first = run(patched(patch_node, flux, "diagonal", (0.0, 1.0)), inputs, [r1, r2], cfg=2.0)
    assert torch.equal(without_first, run(patched(patch_node, flux), inputs, [r2], cfg=2.0))
    assert torch.equal(without_first, run(flux, inputs, [r2], cfg=2.0))
    without_second = run(patched(patch_node, flux, "diagonal", (1.0, 0.0)), inputs, [r1, r2], cfg=2.0)
    assert torch.equal(without_second, run(flux, inputs, [r1], cfg=2.0))
    both_off = run(patched(patch_node, flux, "diagonal", (0.0, 0.0)), inputs, [r1, r2], cfg=2.0)
    assert torch.equal(both_off, run(flux, inputs, None, cfg=2.0))


def masks_reaching_blocks(model):
    """A clone whose first double block records the attn_mask it is given."""
    seen = []

    def block(args, extra):
        seen.append(args.get("attn_mask"))
        return extra["original_block"](args)

    clone = model.clone()
    clone.set_model_patch_replace(block, "dit", "double_block", 0)
    return clone, seen


def test_strength_one_builds_no_mask_and_other_strengths_bias_the_keys(flux, patch_node, inputs):
    refs = inputs[2]["two_nonsquare"]
    plain, seen = masks_reaching_blocks(patched(patch_node, flux, "diagonal", (1.0, 1.0)))
    base = run(plain, inputs, refs, cfg=2.0)
    assert seen and all(m is None for m in seen)

    gated, seen = masks_reaching_blocks(patched(patch_node, flux, "diagonal", (1.0, 0.5)))
    out = run(gated, inputs, refs, cfg=2.0)
    n_txt, n_target, n1, n2 = 6, 16, 4 * 6, 6 * 4
    mask = seen[0]
    assert mask.shape == (1, 1, 1, n_txt + n_target + n1 + n2)
    assert torch.equal(mask[..., : n_txt + n_target + n1], torch.zeros_like(mask[..., : n_txt + n_target + n1]))
    assert torch.allclose(mask[..., -n2:], torch.full_like(mask[..., -n2:], math.log(0.5)))
    assert not torch.equal(out, base)


def test_conditioning_mask_is_widened_or_refused(flux, patch_node, inputs, adapter):
    refs = inputs[2]["two_nonsquare"]
    model = patched(patch_node, flux, "diagonal", (1.0, 1.0))
    zero = torch.zeros(1, 6 + 16, 6 + 16)
    widened = run(model, inputs, refs, attention_mask=zero, attention_mask_img_shape=(4, 4))
    assert torch.allclose(widened, run(model, inputs, refs), atol=1e-5)  # an all-zero bias changes nothing
    with pytest.raises(ValueError, match="attention_mask of shape"):
        adapter.combined_attention_mask(torch.zeros(1, 5, 5), 6, 16, [24], [1.0], torch.float32, "cpu")


def test_patch_is_on_a_clone_and_replaces_an_earlier_patch(flux, patch_node, adapter):
    import comfy.patcher_extension

    kind = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    once = patched(patch_node, flux, "offset")
    twice = patched(patch_node, once, "diagonal", (1.0, 0.3))
    assert once is not flux and not flux.wrappers.get(kind, {}).get(adapter.WRAPPER_KEY)
    wrappers = twice.wrappers[kind][adapter.WRAPPER_KEY]
    assert len(wrappers) == 1 and wrappers[0].settings.method == "diagonal"
    assert wrappers[0].settings.strengths == (1.0, 0.3)


def test_refuses_a_model_that_is_not_flux_kontext(comfy_host, patch_node):
    import comfy.model_patcher
    import comfy.supported_models

    not_a_diffusion_model = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), "cpu", "cpu")
    with pytest.raises(ValueError, match="needs a FLUX.1 Kontext"):
        patched(patch_node, not_a_diffusion_model)

    fill_config = dict(flux_unet_config(), in_channels=96)  # Flux Fill: concatenates mask channels
    fill = comfy.supported_models.FluxInpaint(fill_config).get_model({}, "")
    with pytest.raises(ValueError, match="Fill/Depth/Canny"):
        patched(patch_node, comfy.model_patcher.ModelPatcher(fill, "cpu", "cpu"))


def test_bad_strength_is_named(flux, patch_node):
    with pytest.raises(ValueError, match="strength of reference 2"):
        patched(patch_node, flux, "diagonal", (1.0, -1.0))


@pytest.mark.parametrize("other_first", [False, True])
def test_other_diffusion_model_wrappers_still_run(flux, patch_node, inputs, other_first):
    import comfy.patcher_extension

    calls = []

    def counting(executor, *args, **kwargs):
        calls.append(len(args[5]))  # (x, timestep, context, y, guidance, ref_latents, ...)
        return executor(*args, **kwargs)

    kind = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    refs = inputs[2]["two_nonsquare"]
    plain = patched(patch_node, flux)
    if other_first:
        model = flux.clone()
        model.add_wrapper_with_key(kind, "test.counting", counting)
        model = patched(patch_node, model)
    else:
        model = plain.clone()
        model.add_wrapper_with_key(kind, "test.counting", counting)
    assert torch.equal(run(model, inputs, refs, steps=2), run(plain, inputs, refs, steps=2))
    assert calls == [2, 2]  # once per step, with both references


def test_three_references_strength_zero_equals_leaving_each_out(flux, patch_node, inputs):
    """Three references (issue 19): unplugging any one with strength 0 gives exactly the run without it,
    and the node's optional strength_3 left at 1 builds the two-strength settings bit for bit."""
    refs = inputs[2]["three_mixed"]
    for k in range(3):
        strengths = tuple(0.0 if j == k else 1.0 for j in range(3))
        rest = [r for j, r in enumerate(refs) if j != k]
        out = run(patched(patch_node, flux, "diagonal", strengths), inputs, refs, cfg=2.0, target=(8, 6))
        assert torch.equal(out, run(patched(patch_node, flux, "diagonal", (1.0, 1.0, 1.0)), inputs, rest, cfg=2.0,
                                    target=(8, 6))), k
    all_off = run(patched(patch_node, flux, "diagonal", (0.0, 0.0, 0.0)), inputs, refs, cfg=2.0, target=(8, 6))
    assert torch.equal(all_off, run(flux, inputs, None, cfg=2.0, target=(8, 6)))
    only_first = run(patched(patch_node, flux, "diagonal", (1.0, 0.0, 0.0)), inputs, refs, cfg=2.0, target=(8, 6))
    assert torch.equal(only_first, run(flux, inputs, refs[:1], cfg=2.0, target=(8, 6)))  # native Kontext
    three = run(patched(patch_node, flux, "diagonal", (1.0, 1.0, 1.0)), inputs, refs, cfg=2.0, target=(8, 6))
    assert not torch.equal(three, run(flux, inputs, refs[:2], cfg=2.0, target=(8, 6)))  # reference 3 matters
    default = patch_node.execute(flux, "diagonal", 1.0, 0.3).result[0]
    explicit = patch_node.execute(flux, "diagonal", 1.0, 0.3, 1.0).result[0]
    import comfy.patcher_extension

    kind = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    settings = [m.wrappers[kind][next(iter(m.wrappers[kind]))][0].settings for m in (default, explicit)]
    assert settings[0] == settings[1] and settings[0].strengths == (1.0, 0.3)


def test_three_references_one_strength_biases_only_its_keys(flux, patch_node, inputs):
    refs = inputs[2]["three_mixed"]  # token grids 3x5, 5x2, 2x2
    gated, seen = masks_reaching_blocks(patched(patch_node, flux, "diagonal", (1.0, 1.0, 0.5)))
    run(gated, inputs, refs, cfg=2.0)
    n_txt, n_target, n1, n2, n3 = 6, 16, 15, 10, 4
    mask = seen[0]
    assert mask.shape == (1, 1, 1, n_txt + n_target + n1 + n2 + n3)
    assert torch.equal(mask[..., :-n3], torch.zeros_like(mask[..., :-n3]))
    assert torch.allclose(mask[..., -n3:], torch.full_like(mask[..., -n3:], math.log(0.5)))
