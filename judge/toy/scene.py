"""DualShapes scenes: a JSON-able description and the one renderer that turns it into pixels.

A *scene* is ``{"size": [H, W], "background": {...}, "elements": [...]}``. The generator writes
scenes into each sample's plan; the toy judge re-renders them to know exactly what belongs where.
Rendering samples the centre of every ``CELL`` x ``CELL`` block of pixels (no anti-aliasing), so an
exact target holds only palette colours and gradient rows, is made of 2x2 blocks (gradients aside), and the same
scene always gives the same bytes. The blocks are the world's "coarse rendering": with the tiny
VAE's 4x downsampling each latent cell covers 2x2 blocks (12 numbers for 16 channels), which the
VAE learns to reconstruct crisply in a fraction of the steps that per-pixel detail (thin texture
bands at arbitrary offsets) needed; textures are laid out in blocks too.

Backgrounds: ``{"kind": "flat", "colour"}``, ``{"kind": "gradient", "top", "bottom"}``,
``{"kind": "horizon", "sky", "ground", "level"}`` (``level``: the horizon row as a fraction of H).
Elements (drawn in order, later ones on top):
``{"kind": "shape", "shape", "colour", "texture", "colour2", "box": [x0, y0, x1, y1]}`` and
``{"kind": "figure", "box", "skin", "garment", "texture", "colour2", "legs", "pose"}``;
boxes are in pixels, end-exclusive; ``texture`` is solid/stripes/checks/dots drawn in ``colour2``.
"""
from __future__ import annotations

import functools

import numpy as np

# Saturated object colours, pairwise >= ~100 apart in RGB (checked by the tests).
OBJECT_COLOURS = {
    "red": (215, 30, 40), "orange": (250, 135, 10), "yellow": (240, 235, 70), "green": (35, 180, 60),
    "cyan": (40, 215, 225), "blue": (35, 65, 225), "purple": (125, 35, 170), "pink": (245, 85, 200),
    "white": (250, 250, 250), "black": (25, 25, 25),
}
# Muted scene colours for backgrounds (skies, grounds, walls).
BACKGROUND_COLOURS = {
    "sky": (150, 190, 230), "grass": (105, 145, 80), "sand": (215, 195, 140), "slate": (95, 105, 125),
    "navy": (30, 40, 85), "cream": (235, 230, 205), "lavender": (185, 170, 220), "mint": (165, 215, 190),
}
SKIN_COLOURS = {"light": (240, 195, 160), "dark": (120, 75, 45)}
COLOURS = {**OBJECT_COLOURS, **BACKGROUND_COLOURS, **SKIN_COLOURS}

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
TEXTURES = ("solid", "stripes", "checks", "dots")
POSES = ("down", "out", "up")
# The 3x3 grid of named places, row by row.
PLACES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
SHAPE_SIDE = 0.25  # side as a fraction of the shorter image side (16 px, 2x2 tokens at 64 px)
FIGURE_SCALES = {"small": 0.42, "medium": 0.56, "large": 0.72}  # height as a fraction of H
FIGURE_COLUMNS = {"left": 0.25, "center": 0.5, "right": 0.75}  # x centre as a fraction of W
GROUND = 0.875  # feet row as a fraction of H
PART_IDS = {"shape": 0, "legs": 1, "garment": 2, "arms": 3, "head": 4}
CELL = 2  # pixels per side of a rendered block (see the module docstring)
# Pixels per side of one token of the toy models (VAE 4x, 2x2 patches). Places, shape sides and
# figure boxes sit on this grid (WORLD_VERSION 4), so moving an object from one place to another is a
# shift by whole tokens, which the RoPE-positioned transformer can learn as a copy; off-grid
# geometry changed every token's content with the move, and the toy SFT did not learn the edits.
TOKEN = 8
TEXTURE_PERIOD = 4  # in blocks: stripes/checks in 2-block (4 px) bands; dots: 2x2 blocks on a 4-block grid


def rgb(name: str) -> np.ndarray:
    try:
        return np.array(COLOURS[name], dtype=np.float32)
    except KeyError:
        raise ValueError(f"unknown colour {name!r}; the toy world knows {', '.join(COLOURS)}") from None


def colour_distance(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b, np.float32)))


def on_grid(value: float, side: int) -> int:
    """``value`` pixels rounded to the grid of a picture ``side`` pixels long: whole tokens where the
    side is a multiple of four tokens (its quarter lines are then token boundaries), else blocks."""
    step = TOKEN if side % (4 * TOKEN) == 0 else CELL
    return step * round(value / step)


def place_centre(place: str, h: int, w: int) -> tuple[int, int]:
    """The centre of a named place: the quarter lines of the picture."""
    row, col = divmod(PLACES.index(place), 3)
    return on_grid((col + 1) * w / 4.0, w), on_grid((row + 1) * h / 4.0, h)


def shape_side(h: int, w: int) -> int:
    short = min(h, w)
    return max(CELL, on_grid(SHAPE_SIDE * short, short))


def shape_box(place: str, h: int, w: int, side: int | None = None) -> list[int]:
    """The box of a shape centred on a named place (``side`` in pixels; default the world's size)."""
    side = shape_side(h, w) if side is None else side
    cx, cy = place_centre(place, h, w)
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    return [x0, y0, x0 + side, y0 + side]


def figure_box(scale: str, x_frac: float, h: int, w: int, max_width: float = 1.0) -> list[int]:
    """A standing figure: feet on the ground row, centred at ``x_frac`` of the width, at most
    ``max_width`` of the width wide (figures side by side in a narrow picture). Height, feet and
    centre line are on the token grid, so a figure looks the same in every token it covers wherever
    it stands."""
    height = max(TOKEN, on_grid(min(FIGURE_SCALES[scale] * h, max_width * w / 0.6), h))
    half_width = round(0.3 * height)
    y1, cx = on_grid(GROUND * h, h), on_grid(x_frac * w, w)
    return [cx - half_width, y1 - height, cx + half_width, y1]


@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int):
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    xs = np.floor(xs / CELL) * CELL + CELL / 2  # every pixel of a block samples the block's centre
    ys = np.floor(ys / CELL) * CELL + CELL / 2
    xs.setflags(write=False)
    ys.setflags(write=False)
    return xs, ys


def _segment(xs, ys, p, q, radius):
    """Pixels within ``radius`` of the segment p-q (a thick line: a figure's arm)."""
    px, py = p
    dx, dy = q[0] - px, q[1] - py
    t = np.clip(((xs - px) * dx + (ys - py) * dy) / max(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
    return (xs - px - t * dx) ** 2 + (ys - py - t * dy) ** 2 <= radius * radius


def shape_mask(shape: str, box, xs, ys) -> np.ndarray:
    x0, y0, x1, y1 = box
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    u, v = (xs - cx) / hw, (ys - cy) / hh  # -1..1 across the box
    if shape == "circle":
        return inside & (u * u + v * v <= 1.0)
    if shape == "square":
        return inside
    if shape == "triangle":  # apex at the top centre, base along the bottom
        return inside & (np.abs(u) <= (v + 1.0) / 2.0)
    if shape == "diamond":
        return inside & (np.abs(u) + np.abs(v) <= 1.0)
    if shape == "cross":
        return inside & ((np.abs(u) <= 1 / 3) | (np.abs(v) <= 1 / 3))
    raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")


def figure_parts(element: dict, xs, ys) -> list[tuple[str, np.ndarray]]:
    """A figure's parts, bottom to top: legs, garment (torso), arms, head."""
    x0, y0, x1, y1 = element["box"]
    height, cx = y1 - y0, (x0 + x1) / 2
    legs = ((ys >= y0 + 0.62 * height) & (ys < y1)
            & (np.abs(np.abs(xs - cx) - 0.1 * height) <= 0.07 * height))
    torso = (np.abs(xs - cx) <= 0.2 * height) & (ys >= y0 + 0.26 * height) & (ys < y0 + 0.64 * height)
    hand_y = {"down": 0.6, "out": 0.3, "up": 0.04}[element.get("pose", "down")]
    arm_r = max(0.8, 0.04 * height)
    arms = np.zeros_like(legs)
    for side in (-1, 1):
        shoulder = (cx + side * 0.18 * height, y0 + 0.3 * height)
        hand = (cx + side * 0.28 * height, y0 + hand_y * height)
        arms |= _segment(xs, ys, shoulder, hand, arm_r)
    head_r = 0.13 * height
    head = (xs - cx) ** 2 + (ys - (y0 + 0.13 * height)) ** 2 <= head_r * head_r
    return [("legs", legs), ("garment", torso), ("arms", arms & ~torso), ("head", head)]


def texture_mask(texture: str, box, xs, ys) -> np.ndarray:
    """Where a texture's second colour goes, anchored at the element's box so it moves with it."""
    period, half = TEXTURE_PERIOD, TEXTURE_PERIOD // 2
    # In blocks from the box's first block, so a texture moves with its element.
    lx = (np.floor(xs / CELL) - box[0] // CELL).astype(np.int32)
    ly = (np.floor(ys / CELL) - box[1] // CELL).astype(np.int32)
    if texture == "solid":
        return np.zeros(xs.shape, bool)
    if texture == "stripes":
        return (ly // half) % 2 == 1
    if texture == "checks":
        return ((lx // half) + (ly // half)) % 2 == 1
    if texture == "dots":
        return ((lx % period) >= 1) & ((lx % period) < 1 + half) & ((ly % period) >= 1) & ((ly % period) < 1 + half)
    raise ValueError(f"unknown texture {texture!r}; use one of {', '.join(TEXTURES)}")


def element_layers(element: dict, xs, ys) -> list[tuple[str, np.ndarray, np.ndarray, tuple | None]]:
    """``(part, mask, colour, (texture_mask, colour2) or None)`` layers of one element, bottom to top."""
    kind = element.get("kind")
    if kind == "shape":
        mask = shape_mask(element["shape"], element["box"], xs, ys)
        return [("shape", mask, rgb(element["colour"]), _texture(element, xs, ys))]
    if kind == "figure":
        colours = {"legs": element["legs"], "garment": element["garment"], "arms": element["skin"],
                   "head": element["skin"]}
        return [(part, mask, rgb(colours[part]), _texture(element, xs, ys) if part == "garment" else None)
                for part, mask in figure_parts(element, xs, ys)]
    raise ValueError(f"unknown element kind {kind!r}; use 'shape' or 'figure'")


def _texture(element: dict, xs, ys):
    texture = element.get("texture", "solid")
    if texture == "solid":
        return None
    return texture_mask(texture, element["box"], xs, ys), rgb(element["colour2"])


def render_background(background: dict, h: int, w: int) -> np.ndarray:
    kind = background.get("kind")
    image = np.empty((h, w, 3), np.float32)
    if kind == "flat":
        image[:] = rgb(background["colour"])
    elif kind == "gradient":
        # Per pixel row, not per block: a smooth ramp costs the VAE nothing, and 2-row steps would
        # read as banding once a picture is resized.
        t = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None, None]
        image[:] = (1 - t) * rgb(background["top"]) + t * rgb(background["bottom"])
    elif kind == "horizon":
        level = round(background["level"] * h / CELL) * CELL
        image[:level] = rgb(background["sky"])
        image[level:] = rgb(background["ground"])
    else:
        raise ValueError(f"unknown background kind {kind!r}; use flat, gradient or horizon")
    return image


def _element_box(element: dict, h: int, w: int):
    """The pixel rows/columns an element can touch (its box, plus the arms' round ends)."""
    x0, y0, x1, y1 = element["box"]
    pad = 2 if element.get("kind") == "figure" else 0
    return max(0, y0 - pad), min(h, y1 + pad), max(0, x0 - pad), min(w, x1 + pad)


def render(scene: dict, with_owner: bool = False, with_parts: bool = False):
    """HxWx3 uint8 pixels of a scene.

    ``with_owner`` adds an HxW int map of the element (index into ``scene["elements"]``) visible at
    each pixel, -1 for background; ``with_parts`` also adds which part of it (``PART_IDS``).
    """
    h, w = scene["size"]
    xs, ys = _grid(h, w)
    image = render_background(scene["background"], h, w)
    owner = np.full((h, w), -1, np.int32)
    parts = np.full((h, w), -1, np.int8)
    for index, element in enumerate(scene["elements"]):
        r0, r1, c0, c1 = _element_box(element, h, w)
        if r0 >= r1 or c0 >= c1:
            continue
        local = (slice(r0, r1), slice(c0, c1))
        region, own, part = image[local], owner[local], parts[local]
        for name, mask, colour, texture in element_layers(element, xs[local], ys[local]):
            region[mask] = colour
            if texture is not None:
                region[mask & texture[0]] = texture[1]
            own[mask] = index
            part[mask] = PART_IDS[name]
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if with_parts:
        return pixels, owner, parts
    return (pixels, owner) if with_owner else pixels


def background_samples(background: dict) -> list[np.ndarray]:
    """Colours a background shows (gradients sampled along their ramp) for contrast checks."""
    kind = background["kind"]
    if kind == "flat":
        return [rgb(background["colour"])]
    if kind == "horizon":
        return [rgb(background["sky"]), rgb(background["ground"])]
    top, bottom = rgb(background["top"]), rgb(background["bottom"])
    return [(1 - t) * top + t * bottom for t in np.linspace(0, 1, 9)]
