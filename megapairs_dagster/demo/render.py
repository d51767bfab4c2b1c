"""Draw a demo scene as a small RGB image with PIL and numpy.

Objects are drawn at twice the output size and box-filtered down for clean edges.
Positions get a little jitter and the whole image light noise, so two renderings of
the same scene are similar but never identical, like two photos of one subject.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from .scenes import BACKGROUNDS, OBJECT_COLOURS, POSITIONS

IMAGE_SIZE = 128
_SUPERSAMPLE = 2
_CANVAS = IMAGE_SIZE * _SUPERSAMPLE
# Cell centres leave room for a large object plus jitter both to the border and to the
# neighbouring cell, so objects never touch each other or the image border.
_CELL_CENTRES = (24, 64, 104)
_RADIUS = {"small": 8, "medium": 12, "large": 16}
_MAX_JITTER = 3
_PATTERN_PERIOD = 8 * _SUPERSAMPLE
_PATTERN_SHADE = 0.5
_NOISE_STD = 3.0
_GRADIENT_SPAN = 14.0

_ROWS, _COLUMNS = np.mgrid[0:_CANVAS, 0:_CANVAS]
_TEXTURE_MASKS = {
    "solid": np.zeros((_CANVAS, _CANVAS), dtype=bool),
    "striped": ((_ROWS + _COLUMNS) // (_PATTERN_PERIOD // 2)) % 2 == 0,
    "dotted": (_ROWS % _PATTERN_PERIOD - _PATTERN_PERIOD / 2) ** 2
    + (_COLUMNS % _PATTERN_PERIOD - _PATTERN_PERIOD / 2) ** 2
    < (_PATTERN_PERIOD / 4) ** 2,
    "checkered": ((_ROWS // _PATTERN_PERIOD) + (_COLUMNS // _PATTERN_PERIOD)) % 2 == 0,
}


def _star_points(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
    return list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))


def _cross_points(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    arm = radius * 0.35
    outline = [
        (-arm, -radius),
        (arm, -radius),
        (arm, -arm),
        (radius, -arm),
        (radius, arm),
        (arm, arm),
        (arm, radius),
        (-arm, radius),
        (-arm, arm),
        (-radius, arm),
        (-radius, -arm),
        (-arm, -arm),
    ]
    return [(cx + dx, cy + dy) for dx, dy in outline]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float) -> None:
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    elif shape == "square":
        draw.regular_polygon((cx, cy, radius * 1.2), 4, rotation=0, fill=255)
    elif shape == "diamond":
        draw.regular_polygon((cx, cy, radius), 4, rotation=45, fill=255)
    elif shape == "triangle":
        draw.regular_polygon((cx, cy + radius * 0.15, radius * 1.1), 3, rotation=0, fill=255)
    elif shape == "hexagon":
        draw.regular_polygon((cx, cy, radius), 6, rotation=0, fill=255)
    elif shape == "star":
        draw.polygon(_star_points(cx, cy, radius * 1.05), fill=255)
    elif shape == "cross":
        draw.polygon(_cross_points(cx, cy, radius), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _background(name: str, rng: np.random.Generator) -> np.ndarray:
    """A nearly flat background: the named colour with a gentle vertical gradient."""
    direction = 1.0 if rng.random() < 0.5 else -1.0
    ramp = np.linspace(-_GRADIENT_SPAN / 2, _GRADIENT_SPAN / 2, _CANVAS) * direction
    base = np.asarray(BACKGROUNDS[name], dtype=np.float32)
    return np.broadcast_to(base + ramp[:, None, None], (_CANVAS, _CANVAS, 3)).copy()


def render_scene(scene: dict, rng: np.random.Generator) -> Image.Image:
    """Render a scene as an IMAGE_SIZE x IMAGE_SIZE RGB image; ``rng`` drives jitter and noise."""
    canvas = _background(scene["background"], rng)
    for obj in scene["objects"]:
        column, row = POSITIONS[obj["position"]]
        jitter_x, jitter_y = rng.integers(-_MAX_JITTER, _MAX_JITTER + 1, size=2)
        centre_x = float((_CELL_CENTRES[column] + jitter_x) * _SUPERSAMPLE)
        centre_y = float((_CELL_CENTRES[row] + jitter_y) * _SUPERSAMPLE)
        mask_image = Image.new("L", (_CANVAS, _CANVAS), 0)
        _draw_shape(
            ImageDraw.Draw(mask_image),
            obj["shape"],
            centre_x,
            centre_y,
            _RADIUS[obj["size"]] * _SUPERSAMPLE,
        )
        inside = np.asarray(mask_image) > 0
        colour = np.asarray(OBJECT_COLOURS[obj["colour"]], dtype=np.float32)
        patterned = inside & _TEXTURE_MASKS[obj["texture"]]
        canvas[inside] = colour
        canvas[patterned] = colour * _PATTERN_SHADE
    small = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).resize(
        (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX
    )
    noisy = np.asarray(small, dtype=np.float32) + rng.normal(
        0.0, _NOISE_STD, small.size[::-1] + (3,)
    )
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    """Encode as JPEG; PIL writes no timestamps, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
