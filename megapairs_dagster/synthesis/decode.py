"""JPEG decoding for image encoders, with the per-image work cut to what must be per image.

An encoder's preprocess is a torchvision ``Compose`` of PIL steps (resize, crop, mode),
``ToTensor`` and ``Normalize``. Run per image, the tensor steps are ~6 small torch calls
each, which cost more than the decode on small images (docs/benchmarks/embed.md). Here the
Compose is split: per image, the JPEG is decoded at a reduced DCT scale when the first step
shrinks it anyway (PIL's ``draft``: libjpeg skips most of the inverse DCT) and the PIL steps
run to uint8 pixels; per batch, ``ToTensor``'s scaling and ``Normalize`` run once over the
stacked batch (elementwise the same float32 ops, so the same values).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

PilStep = Callable[[Image.Image], Image.Image]


@dataclass(frozen=True)
class BatchPreprocess:
    """A preprocess split into per-image PIL steps and one per-batch tensor step."""

    pil_steps: tuple[PilStep, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Shorter side the first step resizes to; the JPEG is decoded at the smallest DCT scale
    # that keeps both sides >= it. None: decode at full size (pixels as PIL's plain decode).
    draft_side: int | None

    def decode(self, jpeg: bytes) -> np.ndarray:
        """One JPEG to (H, W, 3) uint8 pixels after the PIL steps."""
        with Image.open(io.BytesIO(jpeg)) as image:
            if self.draft_side is not None:
                image.draft("RGB", (self.draft_side, self.draft_side))
            image = image.convert("RGB")
        for step in self.pil_steps:
            image = step(image)
        return np.asarray(image)

    def to_tensor(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """Stack decoded images into the (N, 3, H, W) float32 batch the encoder takes."""
        batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div_(255)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return batch.sub_(mean).div_(std)


def split_preprocess(
    transform: Callable[[Image.Image], torch.Tensor], *, reduced_dct: bool = True
) -> BatchPreprocess | None:
    """Split ``Compose([PIL steps..., ToTensor(), Normalize(mean, std)])``; None for any
    other shape (the caller then runs ``transform`` per image).

    ``reduced_dct`` decodes at a reduced scale when the first step is a ``Resize`` to a
    shorter side of at most half the image's: the pixels then differ slightly from a
    full-size decode followed by the same resize (tests/test_decode.py bounds it).
    """
    if not isinstance(transform, transforms.Compose) or len(transform.transforms) < 2:
        return None
    *pil_steps, to_tensor, normalize = transform.transforms
    if not isinstance(to_tensor, transforms.ToTensor) or not isinstance(
        normalize, transforms.Normalize
    ):
        return None
    if any(isinstance(step, transforms.ToTensor | transforms.Normalize) for step in pil_steps):
        return None
    first = pil_steps[0] if pil_steps else None
    draft_side = None
    if reduced_dct and isinstance(first, transforms.Resize):
        # an int or [int] resizes the shorter side; an (h, w) pair squashes: not handled
        size = [first.size] if isinstance(first.size, int) else list(first.size)
        draft_side = size[0] if len(size) == 1 else None
    return BatchPreprocess(
        pil_steps=tuple(pil_steps),
        mean=tuple(float(v) for v in normalize.mean),
        std=tuple(float(v) for v in normalize.std),
        draft_side=draft_side,
    )
