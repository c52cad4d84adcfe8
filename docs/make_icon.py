"""Draw docs/icon.png, the registry icon: two reference tiles -> the edited tile, in DualShapes' style.

    python docs/make_icon.py        # writes docs/icon.png (400 x 400, PIL only)

Reference 1 is a scene (sky, ground, a black diamond), reference 2 a subject (a red cross on a dark
backdrop); the edit puts the cross into the scene, as the animal-scene template does.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 400
OUT = Path(__file__).resolve().parent / "icon.png"
BACKGROUND = (246, 246, 250)
SKY, GROUND = (182, 168, 220), (98, 140, 84)
NIGHT_TOP, NIGHT_BOTTOM = (30, 38, 84), (96, 104, 136)
DIAMOND, CROSS, ARROW, FRAME = (22, 22, 22), (214, 36, 44), (120, 120, 130), (70, 70, 80)


def _scene(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    horizon = y0 + (y1 - y0) // 2
    draw.rectangle((x0, y0, x1, horizon), fill=SKY)
    draw.rectangle((x0, horizon, x1, y1), fill=GROUND)
    u = (x1 - x0) / 8  # the toy world's token grid: shapes are 2 x 2 cells
    cx, cy = x0 + 1.5 * u, y1 - 1.5 * u
    draw.polygon([(cx, cy - u), (cx + u, cy), (cx, cy + u), (cx - u, cy)], fill=DIAMOND)


def _cross(draw: ImageDraw.ImageDraw, cx: float, cy: float, u: float) -> None:
    arm = u / 3
    draw.rectangle((cx - u, cy - arm, cx + u, cy + arm), fill=CROSS)
    draw.rectangle((cx - arm, cy - u, cx + arm, cy + u), fill=CROSS)


def _subject(image: Image.Image, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    draw = ImageDraw.Draw(image)
    for y in range(y0, y1 + 1):  # a vertical gradient backdrop
        t = (y - y0) / (y1 - y0)
        draw.line((x0, y, x1, y), fill=tuple(round(a + (b - a) * t) for a, b in zip(NIGHT_TOP, NIGHT_BOTTOM)))
    u = (x1 - x0) / 8
    _cross(draw, (x0 + x1) / 2, (y0 + y1) / 2, u)


def _arrow(draw: ImageDraw.ImageDraw, x: float, y: float) -> None:
    draw.polygon([(x - 12, y), (x + 12, y), (x, y + 14)], fill=ARROW)


def draw_icon() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    tile, gap, top = 150, 28, 24
    left = (SIZE - 2 * tile - gap) // 2
    ref1 = (left, top, left + tile, top + tile)
    ref2 = (left + tile + gap, top, left + 2 * tile + gap, top + tile)
    _scene(draw, ref1)
    _subject(image, ref2)
    edit_size = 176
    edit = ((SIZE - edit_size) // 2, SIZE - edit_size - 14, (SIZE + edit_size) // 2, SIZE - 14)
    _scene(draw, edit)
    u = (edit[2] - edit[0]) / 8
    _cross(draw, edit[2] - 1.5 * u, edit[1] + 1.5 * u, u)  # the cross from reference 2, placed top right
    for box in (ref1, ref2, edit):
        draw.rectangle(box, outline=FRAME, width=3)
    _arrow(draw, (ref1[0] + ref1[2]) / 2 + 30, ref1[3] + 8)
    _arrow(draw, (ref2[0] + ref2[2]) / 2 - 30, ref2[3] + 8)
    return image


if __name__ == "__main__":
    draw_icon().save(OUT, optimize=True)
    print(OUT)
