"""Parity: the same random FLUX weights in ComfyUI's Flux and in diffusers' FluxTransformer2DModel.

Starts from a BFL-format (ComfyUI-native) state dict, the format users have in
``models/diffusion_models``: ComfyUI loads it with its own detection and loader; diffusers gets it
through its own single-file converter, which assumes Kontext's width 3072. So the model is a
depth-1/1 Flux at width 3072 (about 0.5 B parameters, float32). Same two references, same layout
-> relative error <= 1e-5.
"""
import gc

import pytest
import torch

from comfy_models import flux_shapes, flux_unet_config, random_state_dict

pytestmark = pytest.mark.host
diffusers = pytest.importorskip("diffusers")

CONTEXT, POOLED, TOKENS = 4096, 768, 8  # Kontext's own (older ComfyUI does not detect other sizes)
TARGET = (8, 8)
REFS = [(8, 12), (12, 8)]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def models(comfy_host):
    import comfy.sd
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    config = flux_unet_config(hidden=3072, heads=24, axes=(16, 56, 56), context=CONTEXT, vec=POOLED)
    bfl = random_state_dict(flux_shapes(config), seed=11)
    # Both consume (pop from) the dict they get; the tensors are shared, so no extra copy here.
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    comfy_model = comfy.sd.load_diffusion_model_state_dict(bfl, model_options={"dtype": torch.float32})
    del bfl
    assert comfy_model is not None, "ComfyUI did not detect the BFL state dict as a model"
    assert type(comfy_model.model).__name__ == "Flux"
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=CONTEXT, pooled_projection_dim=POOLED,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56),
        )
    transformer.load_state_dict(converted, strict=True, assign=True)
    transformer.eval()
    del converted
    assert not any(p.is_meta for p in transformer.parameters())
    yield comfy_model, transformer
    del comfy_model, transformer
    gc.collect()


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(2)
    return dict(
        x=torch.randn(1, 16, *TARGET, generator=gen),
        refs=[torch.randn(1, 16, h, w, generator=gen) for h, w in REFS],
        context=torch.randn(1, TOKENS, CONTEXT, generator=gen),
        pooled=torch.randn(1, POOLED, generator=gen),
        sigma=torch.tensor([0.7]),
        guidance=torch.tensor([2.5]),
    )


def comfy_output(pack, comfy_model, inputs, method, strengths):
    import importlib

    import comfy.patcher_extension

    adapter = importlib.import_module(pack.__name__ + ".dual_rope.comfy_adapter")
    patched = adapter.apply_position_patch(comfy_model, method, strengths)
    options = {"wrappers": comfy.patcher_extension.copy_nested_dicts(patched.wrappers)}
    with torch.no_grad():
        return patched.model.diffusion_model(
            inputs["x"], inputs["sigma"], inputs["context"], y=inputs["pooled"], guidance=inputs["guidance"],
            ref_latents=inputs["refs"], transformer_options=options,
        )


def diffusers_output(transformer, inputs, method, strengths):
    from dual_rope.diffusers_adapter import dual_reference_forward, prepare_references

    sequence = prepare_references(TARGET, inputs["refs"], method, strengths)
    with torch.no_grad():
        return dual_reference_forward(transformer, inputs["x"], sequence, inputs["context"], inputs["pooled"],
                                      inputs["sigma"], inputs["guidance"])


@pytest.mark.parametrize("method,strengths", [
    ("diagonal", (1.0, 1.0)), ("offset", (1.0, 1.0)), ("diagonal", (1.0, 0.5)),
    ("diagonal", (0.0, 1.0)),  # one reference: native Kontext
])
def test_comfyui_and_diffusers_agree(pack, models, inputs, method, strengths):
    comfy_model, transformer = models
    a = comfy_output(pack, comfy_model, inputs, method, strengths)
    b = diffusers_output(transformer, inputs, method, strengths)
    rel = ((a - b).norm() / b.norm()).item()
    print(f"{method} {strengths}: relative error {rel:.2e}")
    assert a.shape == b.shape == inputs["x"].shape
    assert rel <= TOLERANCE


def test_comfyui_and_diffusers_agree_on_three_references(pack, models, inputs):
    """Issue 19: reference 3 on the diagonal past reference 2, with a strength on it, in both hosts."""
    comfy_model, transformer = models
    three = dict(inputs, refs=inputs["refs"] + [torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(3))])
    for strengths in ((1.0, 1.0, 1.0), (1.0, 1.0, 0.5)):
        a = comfy_output(pack, comfy_model, three, "diagonal", strengths)
        b = diffusers_output(transformer, three, "diagonal", strengths)
        rel = ((a - b).norm() / b.norm()).item()
        print(f"three references {strengths}: relative error {rel:.2e}")
        assert rel <= TOLERANCE
