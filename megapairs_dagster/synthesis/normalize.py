"""Turn raw corpus samples into uniform RGB JPEGs, or into rejects with a reason.

Every later stage (encoders, mining, the MLLM) sees the same kind of image: RGB, EXIF
orientation applied, longest side at most ``max_side``, identified by a stable ``image_id``
derived from the source bytes, so re-running a shard gives the same ids. Bad inputs never
stop a shard; they become :class:`Reject` rows whose ``reason`` is one of
:data:`REJECT_REASONS`. Captions are repaired rather than rejected where the text is still
usable (undecodable bytes, control and bidirectional-override characters, excess length);
each accepted row names its repairs from :data:`REPAIRS`, so a repaired caption is never
mistaken for the source's own text.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from megapairs_dagster.synthesis.readers import RawSample

REJECT_REASONS: dict[str, str] = {
    "missing_image": "the sample has no image file",
    "empty_image": "the image file has zero bytes",
    "not_an_image": "no image format recognises the bytes",
    "truncated_image": "the header parses but the pixel data is cut short or corrupt",
    "decompression_bomb": "the header claims more than max_pixels pixels (checked before decoding)",
    "image_too_small": "the shorter side is below min_side pixels (checked before decoding)",
    "unsupported_mode": "the pixel mode cannot be converted to RGB",
    "missing_caption": "the sample has no caption",
    "empty_caption": "the caption is empty or only whitespace (after control characters go)",
    "caption_too_long": "the caption is longer than max_caption_chars and long_captions is reject",
    "duplicate_image": "the same source bytes appeared earlier in the shard (detail names it)",
    "unreadable": "any other failure while decoding; detail holds the exception",
}
"""Fixed vocabulary of :attr:`Reject.reason`, with what each one means."""

REPAIRS: dict[str, str] = {
    "caption_invalid_utf8": "bytes that are not UTF-8 (or unpaired surrogates) became U+FFFD",
    "caption_control_chars": "C0/C1 control characters other than whitespace were removed",
    "caption_bidi_controls": "bidirectional embedding, override and isolate characters were removed",
    "caption_truncated": "the caption was cut to max_caption_chars (source_caption_chars: its length)",
}
"""Fixed vocabulary of the ``repairs`` column of accepted images, in the order they apply."""

IMAGE_COLUMNS = {
    "image_id": "int64",
    "key": str,
    "sha256": str,
    "width": "int64",
    "height": "int64",
    "caption": str,
    "jpeg": object,
    "repairs": str,
    "source_caption_chars": "int64",
}
REJECT_COLUMNS = {"key": str, "reason": str, "detail": str}
PROGRESS_EVERY = 100

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Control characters (Unicode category Cc: C0, DEL, C1) except those str.split() treats as
# whitespace (tab, line breaks, the separators U+001C-U+001F, NEL): those become spaces, as
# all whitespace always has, so captions that only differ in whitespace come out unchanged.
_CONTROL_CHARS = re.compile(
    "[" + "".join(
        re.escape(chr(code)) for code in (*range(0x20), *range(0x7F, 0xA0))
        if not chr(code).isspace()
    ) + "]"
)
# Embeddings, overrides and isolates (LRE RLE PDF LRO RLO, LRI RLI FSI PDI): they reorder
# how the text around them displays ("Trojan Source", CVE-2021-42574). The one-character
# marks LRM, RLM and ALM stay: right-to-left captions use them legitimately.
_BIDI_CONTROLS = re.compile("[\u202a-\u202e\u2066-\u2069]")
_SURROGATES = re.compile("[\ud800-\udfff]")  # from JSON escapes or surrogateescape decoding


@dataclass(frozen=True)
class IngestRules:
    """What a sample must satisfy to be kept, and how far its caption may be repaired.

    The asset fills it from the ``corpus_source`` settings of the same names
    (``resources.settings.domain_config``); the others are fixed here.
    """

    max_side: int = 512
    min_side: int = 100
    max_caption_chars: int = 2000
    long_captions: Literal["truncate", "reject"] = "truncate"
    max_pixels: int = 64_000_000
    jpeg_quality: int = 90


DEFAULT_RULES = IngestRules()


@dataclass(frozen=True)
class NormalizedImage:
    """An accepted sample: the normalised JPEG and what identifies it."""

    image_id: int
    key: str
    sha256: str
    width: int
    height: int
    caption: str
    jpeg: bytes
    repairs: str  # comma-separated names from REPAIRS, "" when the caption was used as read
    source_caption_chars: int  # the caption's length as read, before any repair


@dataclass(frozen=True)
class Reject:
    """A sample left out, with a reason from :data:`REJECT_REASONS`."""

    key: str
    reason: str
    detail: str


class _RejectedImage(Exception):
    """Raised inside decoding to leave with a specific reject reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def image_id_from_sha256(digest: bytes) -> int:
    """Stable non-negative int64 id: first 8 digest bytes, big-endian, top bit cleared."""
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


@dataclass
class CleanedCaption:
    """A caption made fit to store and prompt with, and what it took."""

    text: str
    repairs: list[str]  # names from REPAIRS
    source_chars: int  # characters as read (after decoding), before any repair


def clean_caption(raw: str | bytes) -> CleanedCaption:
    """Decode, drop control and bidirectional-override characters, collapse whitespace.

    Undecodable bytes and unpaired surrogates become U+FFFD: Parquet cannot hold a lone
    surrogate, and a caption should not fail a shard.
    """
    repairs = []
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            repairs.append("caption_invalid_utf8")
    else:
        text, surrogates = _SURROGATES.subn("\ufffd", raw)
        if surrogates:
            repairs.append("caption_invalid_utf8")
    source_chars = len(text)
    for name, pattern in (
        ("caption_control_chars", _CONTROL_CHARS),
        ("caption_bidi_controls", _BIDI_CONTROLS),
    ):
        text, removed = pattern.subn("", text)
        if removed:
            repairs.append(name)
    return CleanedCaption(" ".join(text.split()), repairs, source_chars)


def truncate_caption(caption: str, max_chars: int) -> str:
    """At most ``max_chars`` characters, cut at the last space when one is in the kept part."""
    if len(caption) <= max_chars:
        return caption
    kept = caption[:max_chars]
    if caption[max_chars] != " " and " " in kept:
        kept = kept.rsplit(" ", 1)[0]
    return kept.rstrip()


def normalize_sample(sample: RawSample, rules: IngestRules = DEFAULT_RULES) -> NormalizedImage | Reject:
    """Validate one sample and re-encode its image; never raises for bad input."""
    digest = hashlib.sha256(sample.image_bytes).digest() if sample.image_bytes else b""
    return _normalize(sample, digest, rules)


def normalize_shard(
    samples: Iterable[RawSample],
    rules: IngestRules = DEFAULT_RULES,
    *,
    progress: Callable[[int], None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Normalise a shard's samples into ``(images, rejects)`` frames, in input order.

    Exact duplicates of an accepted image become
    ``duplicate_image`` rejects. A :class:`~megapairs_dagster.synthesis.readers.CorpusReadError`
    raised by the sample iterator propagates: whether a damaged container fails the shard
    or keeps what was read is the caller's decision.
    """
    images: list[NormalizedImage] = []
    rejects: list[Reject] = []
    first_key_by_sha: dict[str, str] = {}
    count = 0
    for count, sample in enumerate(samples, start=1):
        digest = hashlib.sha256(sample.image_bytes).digest() if sample.image_bytes else b""
        first_key = first_key_by_sha.get(digest.hex()) if digest else None
        if first_key is not None:
            rejects.append(
                Reject(sample.key, "duplicate_image", f"same bytes as key {first_key!r}")
            )
        else:
            result = _normalize(sample, digest, rules)
            if isinstance(result, NormalizedImage):
                images.append(result)
                first_key_by_sha[result.sha256] = result.key
            else:
                rejects.append(result)
        if progress is not None and count % PROGRESS_EVERY == 0:
            progress(count)
    return _frame(images, IMAGE_COLUMNS), _frame(rejects, REJECT_COLUMNS)


def _frame(records: list, columns: dict) -> pd.DataFrame:
    """Build a frame with fixed columns and dtypes, also when there are no records."""
    return pd.DataFrame(
        {
            name: pd.Series([getattr(record, name) for record in records], dtype=dtype)
            for name, dtype in columns.items()
        }
    )


def _normalize(sample: RawSample, digest: bytes, rules: IngestRules) -> NormalizedImage | Reject:
    if sample.image_bytes is None:
        return Reject(sample.key, "missing_image", "")
    if len(sample.image_bytes) == 0:
        return Reject(sample.key, "empty_image", "")
    if sample.caption is None:
        return Reject(sample.key, "missing_caption", "")
    cleaned = clean_caption(sample.caption)
    caption, repairs = cleaned.text, cleaned.repairs
    if not caption:
        return Reject(sample.key, "empty_caption", repr(sample.caption[:200]))
    if len(caption) > rules.max_caption_chars:
        if rules.long_captions == "reject":
            detail = f"{len(caption)} characters > max_caption_chars {rules.max_caption_chars}"
            return Reject(sample.key, "caption_too_long", detail)
        caption = truncate_caption(caption, rules.max_caption_chars)
        repairs.append("caption_truncated")
    try:
        image = _decode_rgb(sample.image_bytes, rules)
    except _RejectedImage as rejected:
        return Reject(sample.key, rejected.reason, rejected.detail)
    except Exception as exc:  # noqa: BLE001 -- one bad image must not stop the shard
        return Reject(sample.key, "unreadable", f"{type(exc).__name__}: {exc}")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=rules.jpeg_quality)
    return NormalizedImage(
        image_id=image_id_from_sha256(digest),
        key=sample.key,
        sha256=digest.hex(),
        width=image.width,
        height=image.height,
        caption=caption,
        jpeg=buffer.getvalue(),
        repairs=",".join(repairs),
        source_caption_chars=cleaned.source_chars,
    )


def _fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the longest side at most ``max_side`` and the aspect ratio kept."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _decode_rgb(data: bytes, rules: IngestRules) -> Image.Image:
    """Decode fully (to detect truncation), orient, convert to RGB and downscale."""
    max_side, max_pixels = rules.max_side, rules.max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            raise _RejectedImage("not_an_image", str(exc)) from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _RejectedImage("decompression_bomb", str(exc)) from exc
        width, height = image.size
        if width * height > max_pixels:
            raise _RejectedImage(
                "decompression_bomb", f"header claims {width}x{height} > {max_pixels} pixels"
            )
        if min(width, height) < rules.min_side:
            raise _RejectedImage(
                "image_too_small", f"{width}x{height}: shorter side < min_side {rules.min_side}"
            )
        # JPEG only: let the decoder downscale by 1/2..1/8 while staying >= the target size.
        image.draft(image.mode, _fit_within(width, height, max_side))
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _RejectedImage("decompression_bomb", str(exc)) from exc
        except (OSError, SyntaxError, EOFError) as exc:
            raise _RejectedImage("truncated_image", str(exc)) from exc
    rgb = _to_rgb(ImageOps.exif_transpose(image))
    target = _fit_within(rgb.width, rgb.height, max_side)
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return rgb


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB: alpha onto white, 16-bit scaled down, CMYK/gray converted."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    elif image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        rgb = _high_depth_to_gray(image).convert("RGB")
    else:
        try:
            rgb = image.convert("RGB")
        except (ValueError, OSError) as exc:
            raise _RejectedImage("unsupported_mode", f"{image.mode}: {exc}") from exc
    return rgb


def _high_depth_to_gray(image: Image.Image) -> Image.Image:
    """Map 16-bit or 32-bit single-channel pixels to 8-bit without clipping.

    Unsigned 16-bit data (including mode ``I`` holding values in 0..65535, as 16-bit PNGs
    decode in some Pillow versions) is divided by 257 so the full range maps onto 0..255;
    anything else (negative or wider integers, floats) is stretched from its min to its max.
    """
    pixels = np.asarray(image, dtype=np.float64)
    low, high = float(pixels.min()), float(pixels.max())
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and low >= 0 and high <= 65535):
        scaled = pixels / 257.0
    elif high > low:
        scaled = (pixels - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(pixels)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
