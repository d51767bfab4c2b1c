"""Tiny captioned shape images for encoder, embedding and bootstrap tests."""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 170),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")


def shape_image(
    shape: str,
    colour: str,
    background: str,
    *,
    size: int = 64,
    centre: tuple[float, float] = (0.5, 0.5),
    scale: float = 0.3,
    noise: float = 0.0,
    gradient: float = 0.0,
    seed: int = 0,
) -> Image.Image:
    """One shape on a background that may carry pixel noise and a left-to-right gradient."""
    rng = np.random.default_rng(seed)
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = COLOURS[background]
    canvas += np.linspace(-gradient, gradient, size, dtype=np.float32)[None, :, None]
    canvas += rng.normal(0, noise, canvas.shape).astype(np.float32) if noise else 0
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cx, cy, r = centre[0] * size, centre[1] * size, scale * size
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return image


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def captioned_shapes(count: int, seed: int = 0, size: int = 64) -> tuple[list[bytes], list[str]]:
    """Random (shape, colour, background) images with captions that name all three."""
    rng = random.Random(seed)
    jpegs, captions = [], []
    for index in range(count):
        shape = rng.choice(SHAPES)
        colour, background = rng.sample(sorted(COLOURS), 2)
        centre = (rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65))
        image = shape_image(shape, colour, background, size=size, centre=centre, seed=index)
        jpegs.append(jpeg_bytes(image))
        captions.append(f"a {colour} {shape} on a {background} background")
    return jpegs, captions
