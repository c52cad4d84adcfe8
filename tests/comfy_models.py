"""Small FLUX.1 models and VAEs built from the real ComfyUI host's own classes, with seeded random weights.

Shared by the host tests and bench/patch_overhead.py. Needs the host imported first
(``comfy_host.import_host()``); nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import math

import torch


def flux_unet_config(hidden=64, heads=2, axes=(8, 12, 12), depth=1, single=1, context=32, vec=32) -> dict:
    """A ComfyUI ``unet_config`` for a Kontext-shaped Flux (16 latent channels, patch 2, guidance)."""
    import comfy.ldm.flux.model

    config = dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=vec, context_in_dim=context,
        hidden_size=hidden, mlp_ratio=4.0, num_heads=heads, depth=depth, depth_single_blocks=single,
        axes_dim=list(axes), theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
    )
    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    if "txt_ids_dims" in fields:  # newer ComfyUI: a required field (empty for FLUX.1)
        config["txt_ids_dims"] = []
    return config


def _fill(key: str, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Seeded values in place: ~N(0, 1/fan_in) matrices, small biases, norm gains near 1."""
    values = torch.randn(t.shape, generator=gen, device=t.device, dtype=torch.float32)
    if key.endswith("scale") or (t.ndim == 1 and key.endswith("weight")):  # norm gains
        values.mul_(0.1).add_(1.0)
    elif t.ndim >= 2:
        values.div_(math.prod(t.shape[1:]) ** 0.5)
    else:
        values.mul_(0.02)
    return t.copy_(values)


def random_state_dict(shapes: dict[str, torch.Size], seed: int = 0, dtype=torch.float32, device="cpu") -> dict:
    """Seeded random weights for ``shapes`` (BFL/ComfyUI key names)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return {k: _fill(k, torch.empty(tuple(shapes[k]), dtype=dtype, device=device), gen) for k in sorted(shapes)}


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The same seeded values as :func:`random_state_dict`, written in place (no second copy: full-size models)."""
    state = module.state_dict()
    device = next(iter(state.values())).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for key in sorted(state):
        _fill(key, state[key], gen)
    return module


def flux_shapes(unet_config: dict) -> dict[str, torch.Size]:
    """Parameter shapes of ComfyUI's Flux for ``unet_config``, built on the meta device (no memory)."""
    import comfy.ldm.flux.model
    import comfy.ops

    kwargs = {k: v for k, v in unet_config.items() if k != "image_model"}
    module = comfy.ldm.flux.model.Flux(device="meta", operations=comfy.ops.disable_weight_init, **kwargs)
    return {k: v.shape for k, v in module.state_dict().items()}


def build_flux(unet_config: dict | None = None, seed: int = 0, dtype=torch.float32, device=None):
    """A ``ModelPatcher`` around ``comfy.model_base.Flux`` built the way ComfyUI's loader builds it,
    its weights seeded random values, created directly on ``device`` (default: ComfyUI's torch device)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = unet_config or flux_unet_config()
    config = comfy.supported_models.Flux(unet_config)
    config.set_inference_dtype(dtype, None)
    load = torch.device(device) if device else comfy.model_management.get_torch_device()
    model = config.get_model({}, "", device=load)
    randomize_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=torch.device("cpu"))


def conditioning(context: torch.Tensor, pooled: torch.Tensor, refs=None, guidance=2.5, **extra):
    """ComfyUI CONDITIONING: ``[[context, {"pooled_output", "guidance", "reference_latents", ...}]]``."""
    options = {"pooled_output": pooled, "guidance": guidance, **extra}
    if refs is not None:
        options["reference_latents"] = list(refs)
    return [[context, options]]


def sample(model, positive, negative, latent: torch.Tensor, steps=2, cfg=1.0, seed=0) -> torch.Tensor:
    """A real ComfyUI sampling run (euler / simple), like KSampler."""
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent,
                               disable_pbar=True, seed=seed)


TINY_VAE = {
    "ddconfig": {"double_z": True, "z_channels": 16, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
    "embed_dim": 16,
}


def build_vae(seed: int = 0):
    """A ``comfy.sd.VAE`` with FLUX's latent shape (16 channels, 1/8 size) but 32 channels throughout."""
    import comfy.ldm.models.autoencoder
    import comfy.sd

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in comfy.ldm.models.autoencoder.AutoencoderKL(**TINY_VAE).state_dict().items()}
    return comfy.sd.VAE(sd=random_state_dict(shapes, seed), config={"params": TINY_VAE})
