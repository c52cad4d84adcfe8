"""Latent <-> token packing shared by both hosts: 2x2 patches, row-major, channels (c, ph, pw).

This is the order of ComfyUI's ``process_img`` and of diffusers' ``_pack_latents``.
"""
from __future__ import annotations

import torch

PATCH = 2


def token_grid(latent_hw: tuple[int, int], patch: int = PATCH) -> tuple[int, int]:
    """Token grid (rows, cols) of a latent of (height, width); odd sides are padded up."""
    h, w = latent_hw
    return (h + patch - 1) // patch, (w + patch - 1) // patch


def pack(latent: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """(B, C, H, W) latent -> (B, rows*cols, C*patch*patch) tokens (odd sides padded circularly, as ComfyUI does)."""
    b, c, h, w = latent.shape
    ph, pw = (-h) % patch, (-w) % patch
    if ph or pw:
        latent = torch.nn.functional.pad(latent, (0, pw, 0, ph), mode="circular")
    rows, cols = latent.shape[-2] // patch, latent.shape[-1] // patch
    x = latent.reshape(b, c, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, rows * cols, c * patch * patch)


def unpack(tokens: torch.Tensor, latent_hw: tuple[int, int], patch: int = PATCH) -> torch.Tensor:
    """Inverse of :func:`pack`: tokens -> (B, C, H, W), cropping any padding."""
    b, n, d = tokens.shape
    h, w = latent_hw
    rows, cols = token_grid(latent_hw, patch)
    if n != rows * cols:
        raise ValueError(f"{n} tokens do not fill a {rows}x{cols} grid for a latent of {h}x{w}")
    c = d // (patch * patch)
    x = tokens.reshape(b, rows, cols, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, rows * patch, cols * patch)[:, :, :h, :w]
