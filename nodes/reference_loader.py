"""DualReferenceLoader: two (or three) images -> conditioning carrying their reference latents + an output canvas."""
from __future__ import annotations

import logging
import math

import torch
from comfy_api.latest import io

from ..dual_rope.packing import token_grid

log = logging.getLogger(__name__)

MULTIPLE = 16  # pixels: Flux latents are 1/8 of the image and tokens 2x2 latents
CANVAS_OPTIONS = ["reference 1", "reference 2", "reference 3", "custom"]


def budget_size(height: int, width: int, megapixels: float, multiple: int = MULTIPLE) -> tuple[int, int]:
    """(height, width) near ``megapixels`` (1 MP = 1024x1024, as ComfyUI counts) with the image's aspect
    ratio, each side a multiple of ``multiple``; ``megapixels <= 0`` keeps the image's own size."""
    scale = 1.0 if megapixels <= 0 else math.sqrt(megapixels * 1024 * 1024 / (height * width))
    return snap(height * scale, multiple), snap(width * scale, multiple)


def snap(pixels: float, multiple: int = MULTIPLE) -> int:
    """Nearest multiple (halves round up, unlike Python's round), at least one multiple."""
    return max(multiple, math.floor(pixels / multiple + 0.5) * multiple)


def _resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, height, width); area when shrinking (anti-aliased), bicubic when growing."""
    if images.shape[-2:] == (height, width):
        return images
    shrink = height * width < images.shape[-2] * images.shape[-1]
    out = torch.nn.functional.interpolate(images, size=(height, width), mode="area" if shrink else "bicubic",
                                          align_corners=None if shrink else False)
    return out.clamp(0.0, 1.0)


def fit_to_box(image: torch.Tensor, height: int, width: int, crop: bool) -> torch.Tensor:
    """Scale an IMAGE (B, H, W, C) uniformly (never stretched) into a ``height`` x ``width`` box.

    ``crop=False``: the whole image fits inside and the few leftover pixels (under one multiple of 16)
    repeat its edges; ``crop=True``: it covers the box and the overhang is cut off, centred.
    """
    h, w = image.shape[1], image.shape[2]
    pick = max if crop else min
    scale = pick(height / h, width / w)
    new_h, new_w = round(h * scale), round(w * scale)
    new_h, new_w = (max(height, new_h), max(width, new_w)) if crop else (min(height, new_h), min(width, new_w))
    x = _resize(image.movedim(-1, 1), new_h, new_w)
    if crop:
        top, left = (new_h - height) // 2, (new_w - width) // 2
        x = x[:, :, top:top + height, left:left + width]
    elif (new_h, new_w) != (height, width):
        top, left = (height - new_h) // 2, (width - new_w) // 2
        pad = (left, width - new_w - left, top, height - new_h - top)
        x = torch.nn.functional.pad(x, pad, mode="replicate")
    return x.movedim(1, -1)


def check_image(name: str, image) -> torch.Tensor:
    if image is None or not torch.is_tensor(image) or image.ndim != 4 or image.numel() == 0:
        shape = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise ValueError(f"{name} is empty or not an IMAGE (got {shape}); connect a Load Image node with a picture.")
    if image.shape[-1] < 3:
        raise ValueError(f"{name} has {image.shape[-1]} channel(s); an RGB image is needed.")
    return image[..., :3]


def batch_size(*images: torch.Tensor) -> int:
    """The common batch of ``image_1, image_2[, image_3]``: equal sizes, or 1 to pair with every image."""
    sizes = [image.shape[0] for image in images]
    big = max(sizes)
    for k, b in enumerate(sizes):
        if b not in (1, big):
            other = sizes.index(big)
            raise ValueError(
                f"image_{k + 1} has a batch of {b} and image_{other + 1} a batch of {big}; give them the same "
                "batch size, or one single image to pair with every image of the other."
            )
    return big


def canvas_latent(canvas: str, latents: list[torch.Tensor], width: int, height: int, batch: int, ratio: int):
    """Zero LATENT for the output: the size of a chosen reference, or ``width`` x ``height`` (snapped to 16)."""
    channels = latents[0].shape[1]
    if canvas == "custom":
        height, width = snap(height), snap(width)
        shape = (batch, channels, height // ratio, width // ratio)
    else:
        k = CANVAS_OPTIONS.index(canvas)
        if k >= len(latents):
            raise ValueError(f"canvas is '{canvas}' but only {len(latents)} images are connected; connect "
                             f"image_{k + 1} or pick another canvas.")
        ref = latents[k]
        shape = (batch, *ref.shape[1:])
    import comfy.model_management

    return {"samples": torch.zeros(shape, device=comfy.model_management.intermediate_device())}


def image_tokens(latent: torch.Tensor) -> int:
    """Image tokens the transformer sees for one latent (B, C, H, W): 2x2 latent patches."""
    rows, cols = token_grid(tuple(latent.shape[-2:]))
    return rows * cols


def size_report(latents: list[torch.Tensor], canvas: torch.Tensor, ratio: int) -> str:
    """What the run will cost in image tokens: each reference, the canvas, the total and its multiple
    of a plain Flux run on the same canvas (e.g. two 1 MP references + a 1 MP canvas: 12288 = 3x)."""
    def line(name: str, latent: torch.Tensor) -> str:
        h, w = latent.shape[-2:]
        return f"{name}: {w * ratio}x{h * ratio} px, {image_tokens(latent)} tokens"

    canvas_tokens = image_tokens(canvas)
    total = canvas_tokens + sum(image_tokens(x) for x in latents)
    lines = [line(f"reference {k}", x) for k, x in enumerate(latents, start=1)] + [line("output canvas", canvas)]
    lines.append(f"image tokens per step: {total} ({total / canvas_tokens:.1f}x a plain Flux image of the canvas's "
                 "size; attention time grows faster than the token count). Lower megapixels to go faster.")
    return "\n".join(lines)


class DualReferenceLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualReferenceLoader",
            display_name="Dual Reference Loader (DualRef)",
            category="DualRef/conditioning",
            description=(
                "Encodes two reference images (three with the optional image_3) with the VAE and appends their "
                "latents, in order, to the conditioning's reference_latents (like chained ReferenceLatent "
                "nodes). Each image is "
                "scaled to a pixel budget keeping its aspect ratio (sides multiples of 16 px, never "
                "stretched). Also returns an empty LATENT for the output canvas. Use with DiagonalPositionPatch."
            ),
            inputs=[
                io.Conditioning.Input("conditioning", tooltip=(
                    "The instruction's text conditioning (e.g. from CLIP Text Encode).")),
                io.Vae.Input("vae", tooltip="The FLUX VAE (ae.safetensors) that encodes the references."),
                io.Image.Input("image_1", tooltip="Reference 1, usually the scene/image to edit."),
                io.Image.Input("image_2", tooltip="Reference 2, usually the object, person or style to bring in."),
                io.Float.Input("megapixels", default=1.0, min=0.0, max=16.0, step=0.01, tooltip=(
                    "Pixel budget per reference (1.0 = 1024x1024); 0 keeps each image's own size. "
                    "Sides are rounded to multiples of 16 px.")),
                io.Boolean.Input("crop", default=False, tooltip=(
                    "Off: the whole image is kept and the few pixels needed to reach a multiple of 16 repeat "
                    "its edges. On: the image covers the size and the overhang is cut off, centred.")),
                io.Combo.Input("canvas", options=CANVAS_OPTIONS, default=CANVAS_OPTIONS[0], tooltip=(
                    "Size of the output LATENT: that of reference 1, 2 or 3, or width x height.")),
                io.Int.Input("width", default=1024, min=16, max=16384, step=16, tooltip=(
                    "Output width in pixels when canvas is 'custom' (rounded to a multiple of 16).")),
                io.Int.Input("height", default=1024, min=16, max=16384, step=16, tooltip=(
                    "Output height in pixels when canvas is 'custom' (rounded to a multiple of 16).")),
                io.Image.Input("image_3", optional=True, tooltip=(
                    "Optional reference 3, e.g. a second person or object to bring in (refer to it as image 3 "
                    "in the instruction). Left unconnected, the node works with two references as before.")),
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning", tooltip=(
                    "The input conditioning with the reference latents appended to reference_latents "
                    "(reference 1 first).")),
                io.Latent.Output(display_name="latent", tooltip=(
                    "Empty latent for the output canvas; its batch is the larger image batch.")),
                io.String.Output("report", display_name="report", tooltip=(
                    "Each reference's and the canvas's size in pixels and image tokens, and the total per "
                    "sampling step: two 1 MP references and a 1 MP canvas are ~12k tokens, 3x plain Flux, "
                    "which is why a dual-reference run is slower.")),
            ],
        )

    @classmethod
    def execute(cls, conditioning, vae, image_1, image_2, megapixels=1.0, crop=False, canvas=CANVAS_OPTIONS[0],
                width=1024, height=1024, image_3=None) -> io.NodeOutput:
        import node_helpers

        if vae is None or getattr(vae, "first_stage_model", True) is None:
            raise ValueError("DualReferenceLoader needs a VAE: connect Load VAE with the FLUX VAE (ae.safetensors).")
        images = [check_image("image_1", image_1), check_image("image_2", image_2)]
        if image_3 is not None:  # optional: a third reference, placed past reference 2 on the diagonal
            images.append(check_image("image_3", image_3))
        batch = batch_size(*images)
        latents = []
        for k, image in enumerate(images, start=1):
            h, w = budget_size(image.shape[1], image.shape[2], megapixels)
            log.debug("DualRef: reference %d %dx%d -> %dx%d px", k, image.shape[2], image.shape[1], w, h)
            latents.append(vae.encode(fit_to_box(image, h, w, crop)))
        ratio = vae.downscale_ratio if isinstance(getattr(vae, "downscale_ratio", None), int) else 8
        latent = canvas_latent(canvas, latents, width, height, batch, ratio)
        conditioning = node_helpers.conditioning_set_values(conditioning, {"reference_latents": latents}, append=True)
        report = size_report(latents, latent["samples"], ratio)
        log.info("DualReferenceLoader:\n%s", report)
        return io.NodeOutput(conditioning, latent, report)
