"""Dual-reference positions for ComfyUI's Flux (``comfy.ldm.flux.model.Flux``).

A keyed ``DIFFUSION_MODEL`` wrapper on a ``model.clone()`` takes over the part of
``Flux._forward`` that places the reference latents: ids come from :func:`dual_rope.layout.layout`
and packing from the model's own ``process_img``, so one reference under ``diagonal`` (and every
reference under ComfyUI's own methods) gives exactly the tokens and ids ComfyUI would build.
Strength 0 drops a reference before layout; other strengths != 1 add ``log g`` to its keys
through ``forward_orig``'s ``attn_mask``; all strengths 1 build no mask at all.

ComfyUI is imported lazily inside functions, so this module imports without a host.
"""
from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Sequence

import torch

from .gates import active_references, attention_bias, normalise_gates
from .layout import DEFAULT_METHOD, METHODS, Placement, layout
from .packing import token_grid

log = logging.getLogger(__name__)

WRAPPER_KEY = "dualref.position_patch"
MIN_COMFYUI = "0.3.52"  # first ComfyUI whose Flux runs DIFFUSION_MODEL wrappers around _forward


@dataclass(frozen=True)
class PositionSettings:
    """What the patch node chose: layout method and one strength per reference (missing = 1)."""

    method: str = DEFAULT_METHOD
    strengths: tuple[float, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown layout method {self.method!r}; choose one of {', '.join(METHODS)}")
        normalise_gates(self.strengths, len(self.strengths))  # raises, naming the reference


def flux_model_problem(model_patcher) -> str | None:
    """Why ``model_patcher`` cannot take the patch, or ``None`` when it is a FLUX.1 / Kontext model."""
    import comfy.ldm.flux.model as flux_model

    base = getattr(model_patcher, "model", None)
    diffusion = getattr(base, "diffusion_model", None)
    name = type(diffusion).__name__ if diffusion is not None else type(model_patcher).__name__
    if type(diffusion) is not flux_model.Flux:
        return (
            f"DiagonalPositionPatch needs a FLUX.1 Kontext (or FLUX.1) diffusion model, got {name}. "
            "Load flux1-kontext-dev with a UNETLoader/Load Diffusion Model node and connect it here."
        )
    params = diffusion.params
    if len(params.axes_dim) != 3 or getattr(params, "global_modulation", False):
        return (
            "DiagonalPositionPatch works on FLUX.1 Kontext; this is a FLUX.2-style model "
            f"({len(params.axes_dim)} RoPE axes), which places references with its own index method."
        )
    if params.in_channels != params.out_channels:
        return (
            "DiagonalPositionPatch needs FLUX.1 Kontext; this Flux concatenates extra input channels "
            "(Fill/Depth/Canny variant), which cannot take reference latents."
        )
    if not hasattr(flux_model.Flux, "_forward"):
        return (
            f"this ComfyUI's Flux model does not run DIFFUSION_MODEL wrappers; update ComfyUI to "
            f"{MIN_COMFYUI} or newer."
        )
    return None


def apply_position_patch(model_patcher, method: str = DEFAULT_METHOD, strengths: Sequence[float] = ()):
    """A clone of ``model_patcher`` whose Flux places references with ``method`` and ``strengths``.

    Raises ``ValueError`` with a message for the user when the model is not FLUX.1/Kontext.
    A second patch on an already patched model replaces the first (same key).
    """
    import comfy.patcher_extension

    problem = flux_model_problem(model_patcher)
    if problem:
        raise ValueError(problem)
    settings = PositionSettings(method, tuple(float(s) for s in strengths))
    patched = model_patcher.clone()
    kind = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
    patched.add_wrapper_with_key(kind, WRAPPER_KEY, DualReferenceWrapper(settings))
    return patched


class DualReferenceWrapper:
    """``fn(executor, *args, **kwargs)`` around ``Flux._forward``.

    Wrappers added after ours still run (we rebuild the executor chain with our forward as the
    innermost call); without reference latents the native forward runs untouched.
    """

    def __init__(self, settings: PositionSettings):
        self.settings = settings

    def __call__(self, executor, x, timestep, context, y=None, guidance=None, ref_latents=None,
                 control=None, transformer_options={}, **kwargs):
        if not ref_latents:
            return executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)
        model = executor.class_obj
        forward = partial(dual_reference_forward, model, self.settings)
        inner = _inner_executor(executor, forward)
        return inner.execute(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)


def _inner_executor(executor, forward):
    """The rest of the wrapper chain, ending in ``forward`` instead of the native ``_forward``."""
    from comfy.patcher_extension import WrapperExecutor

    wrappers, idx = getattr(executor, "wrappers", None), getattr(executor, "idx", None)
    if wrappers is None or idx is None:  # unknown executor shape: run ours directly
        log.debug("DualRef: wrapper executor without .wrappers/.idx; later wrappers are skipped")
        return WrapperExecutor.new_class_executor(forward, executor.class_obj, [], 0)
    return WrapperExecutor.new_class_executor(forward, executor.class_obj, wrappers, idx + 1)


def _process_target(model, x, transformer_options):
    """The target's tokens/ids exactly as the host's ``_forward`` builds them (rope options if supported)."""
    if "transformer_options" in _process_img_params(type(model)):
        return model.process_img(x, transformer_options=transformer_options)
    return model.process_img(x)


_PARAMS_CACHE: dict[type, frozenset] = {}


def _process_img_params(cls) -> frozenset:
    if cls not in _PARAMS_CACHE:
        _PARAMS_CACHE[cls] = frozenset(inspect.signature(cls.process_img).parameters)
    return _PARAMS_CACHE[cls]


def reference_placements(model, x_hw, ref_latents, settings: PositionSettings):
    """``(kept reference latents, placements [target, refs...], their strengths)`` for one call."""
    strengths = normalise_gates(settings.strengths, len(ref_latents))
    keep = active_references(strengths)
    refs = [ref_latents[k] for k in keep]
    patch = model.patch_size
    grids = [token_grid(tuple(r.shape[-2:]), patch) for r in refs]
    index_scale = float(getattr(model.params, "ref_index_scale", 1.0))
    placements = layout(token_grid(tuple(x_hw), patch), grids, settings.method, index_scale)
    return refs, placements, [strengths[k] for k in keep]


def dual_reference_forward(model, settings: PositionSettings, x, timestep, context, y=None, guidance=None,
                           ref_latents=None, control=None, transformer_options={}, **kwargs):
    """``Flux._forward`` with references placed by our layout and gated by ``settings.strengths``."""
    from einops import rearrange

    method = kwargs.pop("ref_latents_method", None)
    if method is not None and method != settings.method:
        log.debug("DualRef: conditioning asks for reference method %r; DiagonalPositionPatch uses %r",
                  method, settings.method)
    bs, _, h_orig, w_orig = x.shape
    patch = model.patch_size
    img, img_ids = _process_target(model, x, transformer_options)
    img_tokens = img.shape[1]
    refs, placements, gates = reference_placements(model, (h_orig, w_orig), ref_latents or [], settings)
    for ref, place in zip(refs, placements[1:]):
        tokens, ids = _process_reference(model, ref, place)
        img = torch.cat([img, tokens], dim=1)
        img_ids = torch.cat([img_ids, ids], dim=1)

    txt_ids = torch.zeros((bs, context.shape[1], img_ids.shape[-1]), device=x.device, dtype=img_ids.dtype)
    for axis in getattr(model.params, "txt_ids_dims", ()) or ():
        txt_ids[:, :, axis] = torch.linspace(0, context.shape[1] - 1, steps=context.shape[1],
                                             device=x.device, dtype=img_ids.dtype)
    mask = combined_attention_mask(
        kwargs.pop("attention_mask", None), context.shape[1], img_tokens,
        [p.tokens for p in placements[1:]], gates, dtype=x.dtype, device=x.device,
    )
    out = model.forward_orig(img, img_ids, context, txt_ids, timestep, y, guidance, control,
                             transformer_options, attn_mask=mask)
    out = out[:, :img_tokens]
    h_len, w_len = token_grid((h_orig, w_orig), patch)
    return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h_len, w=w_len,
                     ph=patch, pw=patch)[:, :, :h_orig, :w_orig]


def _process_reference(model, ref, place: Placement):
    # process_img takes offsets in latent pixels and rounds them to tokens: row*patch -> row exactly.
    patch = model.patch_size
    return model.process_img(ref, index=place.index, h_offset=place.row * patch, w_offset=place.col * patch)


def combined_attention_mask(existing, text_tokens: int, target_tokens: int, reference_tokens: Sequence[int],
                            gates: Sequence[float], dtype, device):
    """The ``attn_mask`` for ``forward_orig``: ``None``, our key bias, or the conditioning's mask widened.

    ``existing`` is a conditioning's ``attention_mask`` (e.g. from Redux's attn_bias) over text and
    target tokens only, ``(B, Lp, Lp)`` or ``(Lp, Lp)``, bool or additive. It is kept as is for those
    tokens; reference tokens attend and are attended without it, and every query gets ``log g_k``
    on reference k's keys.
    """
    prefix = text_tokens + target_tokens
    bias = attention_bias(prefix, reference_tokens, gates, device=device, dtype=dtype)
    if existing is None:
        return bias
    if existing.ndim == 2:
        existing = existing.unsqueeze(0)
    if existing.ndim != 3 or existing.shape[-1] != prefix or existing.shape[-2] != prefix:
        raise ValueError(
            f"the conditioning carries an attention_mask of shape {tuple(existing.shape)}, but text + target "
            f"have {prefix} tokens; DualRef can only widen a square text+target mask to the references. "
            "Remove the node that set the mask (e.g. a Redux/StyleModelApply with attn_bias) or apply it "
            "without reference latents."
        )
    if existing.dtype == torch.bool:
        existing = torch.zeros(existing.shape, device=device, dtype=dtype).masked_fill(~existing.to(device), -math.inf)
    total = prefix + sum(reference_tokens)
    full = torch.zeros((existing.shape[0], 1, total, total), device=device, dtype=dtype)
    full[:, 0, :prefix, :prefix] = existing.to(device=device, dtype=dtype)
    if bias is not None:
        full = full + bias
    return full
