"""Image inputs, good and bad, built in memory for tests of readers and normalisation.

Import as ``from fixtures_images import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED = (255, 0, 0)
BLUE = (0, 0, 255)
EXIF_ORIENTATION_TAG = 0x0112


def _encode(image: Image.Image, format: str, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_options)
    return buffer.getvalue()


def valid_jpeg(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = BLUE) -> bytes:
    """A plain RGB JPEG of one colour; vary ``color`` to get distinct bytes."""
    return _encode(Image.new("RGB", size, color), "JPEG", quality=95)


def noise_jpeg(size: tuple[int, int] = (256, 256), seed: int = 0) -> bytes:
    """An RGB JPEG of random pixels, so it has plenty of entropy-coded data."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return _encode(Image.fromarray(pixels), "JPEG", quality=90)


def truncated_jpeg(size: tuple[int, int] = (256, 256)) -> bytes:
    """A JPEG whose header is intact but whose scan data stops at 60 %."""
    data = noise_jpeg(size)
    return data[: int(len(data) * 0.6)]


def zero_bytes() -> bytes:
    return b""


def not_an_image() -> bytes:
    return b"<html><body>404 not found</body></html>\n" * 4


def png_with_alpha(size: tuple[int, int] = (40, 20)) -> bytes:
    """RGBA PNG: left half opaque red, right half fully transparent (white after compositing)."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    image.paste((*RED, 255), (0, 0, size[0] // 2, size[1]))
    return _encode(image, "PNG")


def palette_png_with_transparency(size: tuple[int, int] = (20, 20)) -> bytes:
    """P-mode PNG whose palette index 0 (the whole image) is transparent."""
    image = Image.new("P", size, 0)
    image.putpalette([0, 0, 0, *RED])
    return _encode(image, "PNG", transparency=0)


def cmyk_jpeg(size: tuple[int, int] = (32, 32)) -> bytes:
    """CMYK JPEG of pure cyan (decodes to roughly (0, 255, 255) in RGB)."""
    return _encode(Image.new("CMYK", size, (255, 0, 0, 0)), "JPEG", quality=95)


def gray16_png(size: tuple[int, int] = (64, 8)) -> bytes:
    """16-bit grayscale PNG: left half 65535 (white), right half 32768 (mid gray)."""
    pixels = np.full((size[1], size[0]), 32768, dtype=np.uint16)
    pixels[:, : size[0] // 2] = 65535
    return _encode(Image.fromarray(pixels), "PNG")


def gray8_png(size: tuple[int, int] = (16, 16), value: int = 100) -> bytes:
    return _encode(Image.new("L", size, value), "PNG")


def exif_rotated_jpeg(size: tuple[int, int] = (80, 40)) -> bytes:
    """JPEG stored landscape with a red top-left block and EXIF orientation 6.

    Orientation 6 means "rotate 90 degrees clockwise to display", so the displayed image
    is portrait (``size`` swapped) with the red block in the top-right corner.
    """
    image = Image.new("RGB", size, BLUE)
    image.paste(RED, (0, 0, size[0] // 4, size[1] // 4))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6
    return _encode(image, "JPEG", quality=95, exif=exif.tobytes())


def oversized_jpeg(size: tuple[int, int] = (2000, 1000)) -> bytes:
    return valid_jpeg(size, color=(10, 200, 30))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def decompression_bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A genuine all-black 1-bit PNG of ``width`` x ``height`` that compresses to a few KB.

    Written chunk by chunk because Pillow would need a byte per pixel (400 MB at the
    default size) to build it; zlib compresses the rows one at a time.
    """
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then packed zero bits
    compressor = zlib.compressobj(9)
    compressed = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", compressed)
        + _png_chunk(b"IEND", b"")
    )


def write_webdataset_tar(
    path: str | Path, samples: list[tuple[str, bytes | None, str | None]]
) -> Path:
    """Write a webdataset tar: ``KEY.jpg`` and ``KEY.txt`` per sample, None members left out."""
    path = Path(path)
    with tarfile.open(path, "w") as tar:
        for key, jpg, caption in samples:
            for extension, data in (("jpg", jpg), ("txt", caption)):
                if data is None:
                    continue
                payload = data.encode("utf-8") if isinstance(data, str) else data
                member = tarfile.TarInfo(f"{key}.{extension}")
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))
    return path
