"""Per-reference strengths (DESIGN contract 3).

A strength ``g_k`` multiplies every query's attention weight on reference k's tokens before
renormalisation, i.e. adds ``log g_k`` to those logits. ``g = 1`` for all references builds
nothing (the model runs exactly as without gates). ``g = 0`` *unplugs* the reference: it is
dropped before layout, so the result is exactly that of not giving it at all.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def normalise_gates(gates: Sequence[float] | None, count: int) -> list[float]:
    """Validate strengths for ``count`` references; missing means 1."""
    if gates is None:
        return [1.0] * count
    gates = [float(g) for g in gates]
    if len(gates) < count:
        gates += [1.0] * (count - len(gates))
    for k, g in enumerate(gates[:count], start=1):
        if not math.isfinite(g) or g < 0:
            raise ValueError(f"strength of reference {k} must be a finite number >= 0, got {g}")
    return gates[:count]


def active_references(gates: Sequence[float]) -> list[int]:
    """Indices (0-based) of references that take part: strength > 0."""
    return [k for k, g in enumerate(gates) if g > 0]


def needs_bias(gates: Sequence[float]) -> bool:
    return any(g != 1.0 for g in gates if g > 0)


def attention_bias(
    prefix_tokens: int,
    reference_tokens: Sequence[int],
    gates: Sequence[float],
    device=None,
    dtype=torch.float32,
) -> torch.Tensor | None:
    """Additive key bias of shape (1, 1, 1, L) or ``None`` when every active gate is 1.

    ``prefix_tokens`` counts the tokens before the references (text + target), which keep 0.
    ``reference_tokens``/``gates`` list only the references in the sequence (strength > 0).
    """
    if len(reference_tokens) != len(gates):
        raise ValueError("one strength per reference in the sequence is needed")
    if not needs_bias(gates):
        return None
    parts = [torch.zeros(prefix_tokens, device=device, dtype=dtype)]
    for n, g in zip(reference_tokens, gates):
        parts.append(torch.full((n,), math.log(g), device=device, dtype=dtype))
    return torch.cat(parts).view(1, 1, 1, -1)
