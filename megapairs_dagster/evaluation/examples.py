"""Retrieval examples people can look at: a query (image and instruction) beside what a model
ranks first, ground truths framed in green, drawn as one PNG.

A metric says how often a model is right; a few queries drawn out show how it is wrong (the
colour kept and the object lost, the reference image returned). ``benchmark_scores`` attaches
one such picture per scored model, and ``docs/retrieval_demo.ipynb`` draws one for any image and
instruction.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, ImageOps

TILE = 128  # side of one image tile, pixels
TOP = 5  # retrieved candidates shown per query
CAPTION_LINES = 4
LINE_HEIGHT = 12  # Pillow's default font (Aileron, 10 px)
PAD = 6
FRAME = 4  # width of the frame around a ground truth
GROUND_TRUTH = (40, 170, 60)
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
CHARS_PER_LINE = TILE // 6  # about 6 px a character


@dataclass(frozen=True)
class Candidate:
    """One retrieved item: its image (None: a text-only candidate), a label, and whether it is
    a ground truth of the query."""

    image: Image.Image | None
    label: str
    correct: bool


@dataclass(frozen=True)
class RetrievalExample:
    """A query (its image, None for a text-only query, and its text) and its candidates best
    first."""

    image: Image.Image | None
    text: str
    retrieved: Sequence[Candidate]


def picture_size(queries: int) -> tuple[int, int]:
    """(width, height) of the picture of ``queries`` examples: a row each, the query and
    ``TOP`` candidates, each tile with its caption below."""
    return ((1 + TOP) * (TILE + PAD) + PAD,
            queries * (TILE + CAPTION_LINES * LINE_HEIGHT + PAD) + PAD)


def tile_origin(row: int, column: int) -> tuple[int, int]:
    """Top-left pixel of the tile at ``row`` (query), ``column`` (0: the query, 1..TOP: rank)."""
    return PAD + column * (TILE + PAD), PAD + row * (TILE + CAPTION_LINES * LINE_HEIGHT + PAD)


def draw_examples(examples: Sequence[RetrievalExample]) -> Image.Image:
    """The examples as one RGB picture (``picture_size``): per row the query, then the first
    ``TOP`` candidates, a ground truth framed in green; texts wrapped below their tiles."""
    if not examples:
        raise ValueError("no examples to draw")
    picture = Image.new("RGB", picture_size(len(examples)), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for row, example in enumerate(examples):
        cells = [(example.image, f"Q: {example.text}", False)] + [
            (candidate.image, f"{rank}. {candidate.label}", candidate.correct)
            for rank, candidate in enumerate(example.retrieved[:TOP], start=1)]
        for column, (image, caption, correct) in enumerate(cells):
            left, top = tile_origin(row, column)
            if correct:
                draw.rectangle((left, top, left + TILE - 1, top + TILE - 1), fill=GROUND_TRUTH)
            inner = TILE - 2 * FRAME
            if image is not None:
                thumbnail = ImageOps.contain(image.convert("RGB"), (inner, inner))
                picture.paste(thumbnail, (left + FRAME + (inner - thumbnail.width) // 2,
                                          top + FRAME + (inner - thumbnail.height) // 2))
            else:  # a text-only query or candidate: its text in the tile
                draw.rectangle((left + FRAME, top + FRAME, left + TILE - FRAME - 1,
                                top + TILE - FRAME - 1), fill=(235, 235, 235))
            lines = textwrap.wrap(caption, CHARS_PER_LINE, max_lines=CAPTION_LINES,
                                  placeholder=" ...")
            for line_number, line in enumerate(lines):
                draw.text((left, top + TILE + line_number * LINE_HEIGHT), line, fill=TEXT,
                          font=font)
    return picture


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
