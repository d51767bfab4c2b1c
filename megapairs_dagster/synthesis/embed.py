"""Batched embedding of JPEG bytes and captions into L2-normalised float16 matrices.

JPEG decoding and preprocessing run in DataLoader workers so that they overlap the model's
forward pass; the encoder's preprocess is split by ``synthesis.decode`` so that workers
decode at a reduced DCT scale and normalise whole batches. Vectors are normalised in float32
and only then stored as float16.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from megapairs_dagster.synthesis.decode import BatchPreprocess, split_preprocess
from megapairs_dagster.synthesis.encoders import ImageEncoder, TextEncoder

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: np.ndarray  # (rows, dim) float16, unit L2 norm, row i embeds input i
    seconds: float

    @property
    def rows(self) -> int:
        return int(self.vectors.shape[0])


class _DecodedJpegs(Dataset):
    """Decodes one image per item inside a DataLoader worker: to uint8 pixels when the
    preprocess splits (the worker's collate then normalises the batch), else through the
    preprocess itself."""

    def __init__(
        self,
        jpegs: Sequence[bytes],
        preprocess: Callable[[Image.Image], torch.Tensor],
        split: BatchPreprocess | None,
    ):
        self.jpegs = jpegs
        self.preprocess = preprocess
        self.split = split

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, index: int) -> torch.Tensor | np.ndarray:
        if self.split is not None:
            return self.split.decode(self.jpegs[index])
        with Image.open(io.BytesIO(self.jpegs[index])) as image:
            return self.preprocess(image.convert("RGB"))


def _autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for reduced dtypes; a no-op for float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@contextmanager
def _cpu_threads_left(device: torch.device, workers: int) -> Iterator[None]:
    """On the CPU, leave the decoding workers their cores: oversubscribed torch threads
    measured 2.5x slower on 2 cores (bench/embed.py)."""
    if device.type != "cpu" or workers == 0:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - workers))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _normalised_half(embeddings: torch.Tensor) -> np.ndarray:
    return F.normalize(embeddings.float(), dim=-1).cpu().numpy().astype(np.float16)


def embed_images(
    encoder: ImageEncoder,
    jpegs: Sequence[bytes],
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
) -> EmbeddingResult:
    """Embed JPEG-encoded images on the encoder's device; `dtype` is the autocast dtype."""
    start = time.perf_counter()
    vectors = np.empty((len(jpegs), encoder.embed_dim), dtype=np.float16)
    if len(jpegs) == 0:
        return EmbeddingResult(vectors, time.perf_counter() - start)
    workers = min(num_workers, len(jpegs))
    split = split_preprocess(encoder.preprocess)
    loader = DataLoader(
        _DecodedJpegs(jpegs, encoder.preprocess, split),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=split.to_tensor if split is not None else None,
        num_workers=workers,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
    )
    done = 0
    with torch.inference_mode(), _autocast(encoder.device, dtype), _cpu_threads_left(
        encoder.device, workers
    ):
        for pixels in loader:
            batch = _normalised_half(encoder.encode(pixels))
            vectors[done : done + len(batch)] = batch
            done += len(batch)
            if progress is not None:
                progress(done, len(jpegs))
    return EmbeddingResult(vectors, time.perf_counter() - start)


def embed_texts(
    encoder: TextEncoder,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
) -> EmbeddingResult:
    """Embed captions; tokenising is cheap enough to stay in the main process."""
    start = time.perf_counter()
    vectors = np.empty((len(texts), encoder.embed_dim), dtype=np.float16)
    with torch.inference_mode(), _autocast(encoder.device, dtype):
        for begin in range(0, len(texts), batch_size):
            chunk = list(texts[begin : begin + batch_size])
            vectors[begin : begin + len(chunk)] = _normalised_half(
                encoder.encode(encoder.tokenize(chunk))
            )
            if progress is not None:
                progress(begin + len(chunk), len(texts))
    return EmbeddingResult(vectors, time.perf_counter() - start)
