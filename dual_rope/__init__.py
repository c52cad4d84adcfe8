"""Host-agnostic dual-reference RoPE layouts, gates and token packing (plain torch).

Relative imports only: this package is imported both as ``dual_rope`` (headless) and as
``<pack folder>.dual_rope`` (inside ComfyUI).
"""
from .gates import active_references, attention_bias, needs_bias, normalise_gates
from .layout import DEFAULT_METHOD, METHODS, Placement, layout, layout_ids, placement_ids
from .packing import PATCH, pack, token_grid, unpack

__all__ = [
    "DEFAULT_METHOD", "METHODS", "PATCH", "Placement", "active_references", "attention_bias",
    "layout", "layout_ids", "needs_bias", "normalise_gates", "pack", "placement_ids",
    "token_grid", "unpack",
]
