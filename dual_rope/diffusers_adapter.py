"""Dual-reference forward pass for diffusers' ``FluxTransformer2DModel`` (Kontext).

Builds the token sequence ``[target, ref1, ref2, ...]``, their RoPE ids from
:func:`dual_rope.layout.layout`, and — only when a strength is not 1 — the additive
attention bias; then slices the prediction back to the target's tokens. With one reference
and strength 1 this is the same computation as diffusers' ``FluxKontextPipeline``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .gates import active_references, attention_bias, normalise_gates
from .layout import DEFAULT_METHOD, Placement, layout, layout_ids
from .packing import pack, token_grid, unpack


@dataclass
class ReferenceSequence:
    """Packed reference tokens with their ids, reusable across denoising steps."""

    tokens: torch.Tensor | None  # (B, N_ref, C*4) or None when no reference is active
    ids: torch.Tensor  # (N_target + N_ref, 3): target ids first
    placements: list[Placement]
    gates: list[float]  # strengths of the references in the sequence (active ones)

    @property
    def reference_token_counts(self) -> list[int]:
        return [p.tokens for p in self.placements[1:]]


def prepare_references(
    target_hw: tuple[int, int],
    references: Sequence[torch.Tensor],
    method: str = DEFAULT_METHOD,
    gates: Sequence[float] | None = None,
    index_scale: float = 1.0,
) -> ReferenceSequence:
    """Lay out and pack the references once for a target latent of ``target_hw``."""
    strengths = normalise_gates(gates, len(references))
    keep = active_references(strengths)
    refs = [references[k] for k in keep]
    grids = [token_grid(tuple(r.shape[-2:])) for r in refs]
    placements = layout(token_grid(target_hw), grids, method, index_scale)
    device = refs[0].device if refs else None
    ids = layout_ids(placements, device=device)
    tokens = torch.cat([pack(r) for r in refs], dim=1) if refs else None
    return ReferenceSequence(tokens, ids, placements, [strengths[k] for k in keep])


def dual_reference_forward(
    transformer,
    latents: torch.Tensor,
    sequence: ReferenceSequence,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    timestep: torch.Tensor,
    guidance: torch.Tensor | None = None,
    txt_ids: torch.Tensor | None = None,
    joint_attention_kwargs: dict | None = None,
) -> torch.Tensor:
    """Velocity for the target latent ``latents`` (B, C, H, W) given prepared references.

    ``timestep`` and ``guidance`` follow diffusers' convention (sigma in [0, 1]; the model
    scales by 1000 itself).
    """
    hidden = pack(latents)
    n_target = hidden.shape[1]
    if sequence.tokens is not None:
        hidden = torch.cat([hidden, sequence.tokens.to(hidden.dtype)], dim=1)
    if txt_ids is None:
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=hidden.device, dtype=sequence.ids.dtype)
    kwargs = dict(joint_attention_kwargs or {})
    bias = attention_bias(
        encoder_hidden_states.shape[1] + n_target,
        sequence.reference_token_counts,
        sequence.gates,
        device=hidden.device,
        dtype=hidden.dtype,
    )
    if bias is not None:
        kwargs["attention_mask"] = bias
    out = transformer(
        hidden_states=hidden,
        encoder_hidden_states=encoder_hidden_states,
        pooled_projections=pooled_projections,
        timestep=timestep,
        img_ids=sequence.ids.to(hidden.device),
        txt_ids=txt_ids,
        guidance=guidance,
        joint_attention_kwargs=kwargs or None,
        return_dict=False,
    )[0]
    return unpack(out[:, :n_target], tuple(latents.shape[-2:]))
