"""Decoding a pair's images for the model backends, with the pair named on failure, and the
``image_max_side`` rule every describer applies the same way (so backends stay comparable)."""

from __future__ import annotations

import io

from PIL import Image


def open_image(data: bytes, pair_id: str, role: str) -> Image.Image:
    """The image with every pixel decoded (``verify()`` misses a truncated file) and its
    ``format`` kept, or a ValueError naming the pair, so the driver rejects just that pair."""
    try:
        image = Image.open(io.BytesIO(data))  # in memory: no file handle to close
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"pair {pair_id}: cannot decode the {role} image: {error}") from error
    return image


def check_max_side(max_side: int | None) -> int | None:
    if max_side is not None and max_side < 1:
        raise ValueError(f"generation.image_max_side must be positive, got {max_side}")
    return max_side


def fit_within(image: Image.Image, max_side: int | None) -> Image.Image:
    """``image`` scaled down (aspect kept) so that its longer side is at most ``max_side``."""
    if max_side is None or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)
