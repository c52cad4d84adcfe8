"""dual_rope's diffusers adapter vs the way diffusers' own FluxKontextPipeline runs the transformer.

Host-free: a tiny diffusers ``FluxTransformer2DModel`` with seeded random weights.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxKontextPipeline, FluxTransformer2DModel  # noqa: E402

from dual_rope.diffusers_adapter import dual_reference_forward, prepare_references  # noqa: E402

TARGET = (8, 6)  # latent (H, W)


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(8, 12, 12),
    ).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialised layers: every path carries signal
            p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5 if p.ndim > 1 else 50))
    return model


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(5)
    return dict(
        latents=torch.randn(1, 16, *TARGET, generator=gen),
        refs=[torch.randn(1, 16, 8, 12, generator=gen), torch.randn(1, 16, 12, 8, generator=gen)],
        text=torch.randn(1, 7, 32, generator=gen),
        pooled=torch.randn(1, 32, generator=gen),
        timestep=torch.tensor([0.6]),
        guidance=torch.tensor([2.5]),
    )


def ours(transformer, inputs, refs, gates=None, method="diagonal"):
    sequence = prepare_references(TARGET, refs, method, gates)
    with torch.no_grad():
        return dual_reference_forward(
            transformer, inputs["latents"], sequence, inputs["text"], inputs["pooled"],
            inputs["timestep"], inputs["guidance"],
        )


def kontext_pipeline_way(transformer, inputs, ref):
    """One denoising call exactly as FluxKontextPipeline builds it (its own static helpers)."""
    lat = inputs["latents"]
    b, c, h, w = lat.shape
    hidden = FluxKontextPipeline._pack_latents(lat, b, c, h, w)
    ids = FluxKontextPipeline._prepare_latent_image_ids(b, h // 2, w // 2, lat.device, lat.dtype)
    if ref is not None:
        rh, rw = ref.shape[-2:]
        image_ids = FluxKontextPipeline._prepare_latent_image_ids(b, rh // 2, rw // 2, lat.device, lat.dtype)
        image_ids[..., 0] = 1
        hidden = torch.cat([hidden, FluxKontextPipeline._pack_latents(ref, b, c, rh, rw)], dim=1)
        ids = torch.cat([ids, image_ids], dim=0)
    text_ids = torch.zeros(inputs["text"].shape[1], 3).to(dtype=lat.dtype)
    with torch.no_grad():
        out = transformer(
            hidden_states=hidden, timestep=inputs["timestep"], guidance=inputs["guidance"],
            pooled_projections=inputs["pooled"], encoder_hidden_states=inputs["text"], txt_ids=text_ids,
            img_ids=ids, joint_attention_kwargs=None, return_dict=False,
        )[0]
    n = (h // 2) * (w // 2)
    return FluxKontextPipeline._unpack_latents(out[:, :n], h * 8, w * 8, 8)


@pytest.mark.parametrize("gates", [None, [1.0], [1.0, 1.0], [1.0, 1.0, 1.0]])
def test_one_reference_strength_one_equals_kontext_pipeline(transformer, inputs, gates):
    ref = inputs["refs"][0]
    expected = kontext_pipeline_way(transformer, inputs, ref)
    assert torch.equal(ours(transformer, inputs, [ref], gates), expected)
    assert not torch.equal(expected, kontext_pipeline_way(transformer, inputs, None))  # the reference matters


def test_strength_zero_equals_leaving_the_reference_out(transformer, inputs):
    r1, r2 = inputs["refs"]
    assert torch.equal(ours(transformer, inputs, [r1, r2], [0.0, 1.0]), kontext_pipeline_way(transformer, inputs, r2))
    assert torch.equal(ours(transformer, inputs, [r1, r2], [1.0, 0.0]), kontext_pipeline_way(transformer, inputs, r1))
    assert torch.equal(ours(transformer, inputs, [r1, r2], [0.0, 0.0]), kontext_pipeline_way(transformer, inputs, None))


def test_three_references_strength_zero_equals_leaving_each_out(transformer, inputs):
    """Issue 19: with three references, strength 0 on any of them equals the run without it (and two
    unplugged equals native Kontext with the one left); reference 3 sits past reference 2's corner."""
    r1, r2 = inputs["refs"]
    r3 = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(9))
    refs = [r1, r2, r3]
    for k in range(3):
        gates = [0.0 if j == k else 1.0 for j in range(3)]
        rest = [r for j, r in enumerate(refs) if j != k]
        assert torch.equal(ours(transformer, inputs, refs, gates), ours(transformer, inputs, rest)), k
    for k in range(3):
        only = [1.0 if j == k else 0.0 for j in range(3)]
        assert torch.equal(ours(transformer, inputs, refs, only), kontext_pipeline_way(transformer, inputs, refs[k]))
    assert torch.equal(ours(transformer, inputs, refs, [0.0] * 3), kontext_pipeline_way(transformer, inputs, None))
    assert not torch.equal(ours(transformer, inputs, refs), ours(transformer, inputs, refs[:2]))
    rows = prepare_references(TARGET, refs, "diagonal").placements[3]
    assert (rows.index, rows.row, rows.col) == (1, 4 + 6, 6 + 4)  # past references 1 and 2


def captured_attention_kwargs(transformer, inputs, refs, gates):
    seen = []
    hook = transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("joint_attention_kwargs")), with_kwargs=True
    )
    try:
        ours(transformer, inputs, refs, gates)
    finally:
        hook.remove()
    return seen


def test_strength_one_builds_no_mask(transformer, inputs):
    assert captured_attention_kwargs(transformer, inputs, inputs["refs"], [1.0, 1.0]) == [None]
    (kwargs,) = captured_attention_kwargs(transformer, inputs, inputs["refs"], [1.0, 0.5])
    n_prefix = 7 + 4 * 3
    mask = kwargs["attention_mask"]
    assert mask.shape == (1, 1, 1, n_prefix + 24 + 24)
    assert torch.equal(mask[..., : n_prefix + 24], torch.zeros(1, 1, 1, n_prefix + 24))
    assert torch.allclose(mask[..., -24:], torch.log(torch.tensor(0.5)).expand(1, 1, 1, 24))


def test_strength_two_equals_the_reference_given_twice(transformer, inputs):
    """Adding log 2 to reference 2's keys is the same attention as listing its tokens twice."""
    r1, r2 = inputs["refs"]
    gated = ours(transformer, inputs, [r1, r2], [1.0, 2.0])
    seq = prepare_references(TARGET, [r1, r2], "diagonal")
    n_target = (TARGET[0] // 2) * (TARGET[1] // 2)
    r2_tokens, r2_ids = seq.tokens[:, 24:], seq.ids[n_target + 24:]
    seq.tokens = torch.cat([seq.tokens, r2_tokens], dim=1)
    seq.ids = torch.cat([seq.ids, r2_ids], dim=0)
    seq.placements = seq.placements + [seq.placements[-1]]
    seq.gates = [1.0, 1.0, 1.0]
    with torch.no_grad():
        doubled = dual_reference_forward(transformer, inputs["latents"], seq, inputs["text"], inputs["pooled"],
                                         inputs["timestep"], inputs["guidance"])
    assert torch.allclose(gated, doubled, atol=1e-5, rtol=1e-4)
    base = ours(transformer, inputs, [r1, r2])
    assert not torch.allclose(gated, base, atol=1e-3)
