"""Where each image's tokens sit in Flux's 3-axis RoPE space (DESIGN contract 1).

Every id in the project comes from :func:`layout`: the ComfyUI patch and the diffusers
adapter both call it, so a LoRA trained headless sees the same positions in ComfyUI.
All sizes are in *token* units (one token = one 2x2 patch of latent pixels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

METHODS = ("diagonal", "offset", "index", "uxo")
DEFAULT_METHOD = "diagonal"


@dataclass(frozen=True)
class Placement:
    """One image's block of RoPE ids: axis 0 = ``index``, rows from ``row``, cols from ``col``."""

    index: float
    row: int
    col: int
    height: int
    width: int

    @property
    def tokens(self) -> int:
        return self.height * self.width

    def rows(self) -> range:
        return range(self.row, self.row + self.height)

    def cols(self) -> range:
        return range(self.col, self.col + self.width)


def _check_grid(name: str, grid: Sequence[int]) -> tuple[int, int]:
    if len(grid) != 2 or int(grid[0]) < 1 or int(grid[1]) < 1:
        raise ValueError(f"{name} must be a (height, width) token grid of positive sizes, got {tuple(grid)}")
    return int(grid[0]), int(grid[1])


def layout(
    target: Sequence[int],
    references: Sequence[Sequence[int]],
    method: str = DEFAULT_METHOD,
    index_scale: float = 1.0,
) -> list[Placement]:
    """Place the target and each reference; returns ``[target, ref1, ref2, ...]``.

    - ``diagonal`` (ours, the paper's): reference 1 at index 1 from (0, 0), exactly native
      Kontext; reference k>1 at index 1 from (sum of earlier heights, sum of earlier widths),
      so no two references share a row or a column and none is resized to fit another.
    - ``offset`` (ComfyUI default): all at index 1, packed into a near-square mosaic.
    - ``index``: reference k at index k*index_scale from (0, 0).
    - ``uxo`` (UNO): index 0, diagonal starting past the target's bottom-right corner.
    """
    if method not in METHODS:
        raise ValueError(f"unknown layout method {method!r}; choose one of {', '.join(METHODS)}")
    th, tw = _check_grid("target", target)
    placements = [Placement(0, 0, 0, th, tw)]
    used_h = used_w = 0  # extent already covered by earlier references
    for k, grid in enumerate(references, start=1):
        h, w = _check_grid(f"reference {k}", grid)
        if method == "diagonal":
            placements.append(Placement(1, used_h, used_w, h, w))
            used_h, used_w = used_h + h, used_w + w
        elif method == "index":
            placements.append(Placement(k * index_scale, 0, 0, h, w))
        elif method == "uxo":
            placements.append(Placement(0, th + used_h, tw + used_w, h, w))
            used_h, used_w = used_h + h, used_w + w
        else:  # offset: grow along the shorter side of the mosaic so far (ComfyUI's rule)
            row = col = 0
            if h + used_h > w + used_w:
                col = used_w
            else:
                row = used_h
            placements.append(Placement(1, row, col, h, w))
            used_h, used_w = max(used_h, h + row), max(used_w, w + col)
    return placements


def placement_ids(p: Placement, device=None, dtype=torch.float32) -> torch.Tensor:
    """(height*width, 3) ids of one placement, row-major like the token packing."""
    ids = torch.zeros(p.height, p.width, 3, device=device, dtype=dtype)
    ids[..., 0] = p.index
    ids[..., 1] = torch.arange(p.row, p.row + p.height, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(p.col, p.col + p.width, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def layout_ids(placements: Sequence[Placement], device=None, dtype=torch.float32) -> torch.Tensor:
    """(sum of tokens, 3) ids of all placements, in order."""
    return torch.cat([placement_ids(p, device, dtype) for p in placements], dim=0)
