"""The procedural demo corpus, written as img2dataset-style webdataset shards.

Each shard mixes scene families (a base scene and variants that change one or two
attributes) with unrelated single scenes. A shard depends only on (seed, shard index,
images per shard, family fraction), never on how many shards are written, so a new shard
can be added later without touching the others. Some families straddle two shards:
shard s ends with the first members of its "tail family" and shard s+1 starts with the
rest, both recomputed from shard s's seed.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .captions import caption_for_scene
from .render import IMAGE_SIZE, jpeg_bytes, render_scene
from .scenes import make_variant, random_scene

CORPUS_STREAM = 0  # separates the corpus's random streams from the benchmark's
MIN_FAMILY_SIZE, MAX_FAMILY_SIZE = 3, 6
MAX_IMAGES_PER_SHARD = 10_000  # keys hold the index in four digits
STRADDLE_PROBABILITY = 0.5


@dataclass(frozen=True)
class PlannedImage:
    """One image's scene and family bookkeeping, before keys and pixels exist."""

    scene: dict
    family: str | None = None
    member: int = 0  # 0 is the family's base scene
    edit: tuple[str, ...] = ()
    variant_of: str | None = None  # key of the family's base image


def shard_key(shard_index: int, index: int) -> str:
    """The 9-digit sample key img2dataset uses: five digits of shard, four of index."""
    return f"{shard_index:05d}{index:04d}"


def _family(rng: np.random.Generator, family_id: str, size: int) -> list[PlannedImage]:
    base = random_scene(rng)
    members = [PlannedImage(base, family_id, 0)]
    for member in range(1, size):
        variant, edits, _ = make_variant(base, rng)
        members.append(PlannedImage(variant, family_id, member, tuple(edits)))
    return members


def _tail_family(
    seed: int, shard_index: int, images_per_shard: int, family_fraction: float
) -> tuple[list[PlannedImage], int]:
    """Shard ``shard_index``'s straddling family and how many members stay in that shard.

    Shards too small to hold two straddling families' worth of family images get none.
    """
    if shard_index < 0 or round(family_fraction * images_per_shard) < 2 * MAX_FAMILY_SIZE:
        return [], 0
    rng = np.random.default_rng([seed, CORPUS_STREAM, shard_index, 1])
    if rng.random() >= STRADDLE_PROBABILITY:
        return [], 0
    size = int(rng.integers(MIN_FAMILY_SIZE, MAX_FAMILY_SIZE + 1))
    kept = int(rng.integers(1, size))
    return _family(rng, f"{shard_index:05d}-tail", size), kept


def _family_sizes(rng: np.random.Generator, total: int) -> list[int]:
    """Split ``total`` images into families of MIN..MAX_FAMILY_SIZE members."""
    sizes = []
    while total > 0:
        if total <= MAX_FAMILY_SIZE:
            size = total
        else:
            size = int(
                rng.integers(MIN_FAMILY_SIZE, min(MAX_FAMILY_SIZE, total - MIN_FAMILY_SIZE) + 1)
            )
        sizes.append(size)
        total -= size
    return sizes


def plan_shard(
    seed: int, shard_index: int, images_per_shard: int, family_fraction: float = 0.7
) -> list[PlannedImage]:
    """The scenes of one shard in key order, with each variant's base key resolved.

    Exactly ``round(family_fraction * images_per_shard)`` images belong to families
    (straddling members included); the rest are unrelated single scenes.
    """
    if not 0 < images_per_shard <= MAX_IMAGES_PER_SHARD:
        raise ValueError(f"images_per_shard must be in 1..{MAX_IMAGES_PER_SHARD}")
    if not 0.0 <= family_fraction <= 1.0:
        raise ValueError("family_fraction must be in [0, 1]")
    previous_tail, previous_kept = _tail_family(
        seed, shard_index - 1, images_per_shard, family_fraction
    )
    own_tail, own_kept = _tail_family(seed, shard_index, images_per_shard, family_fraction)
    head, foot = previous_tail[previous_kept:], own_tail[:own_kept]
    family_images = round(family_fraction * images_per_shard)
    rng = np.random.default_rng([seed, CORPUS_STREAM, shard_index, 0])
    middle: list[PlannedImage] = []
    for number, size in enumerate(_family_sizes(rng, family_images - len(head) - len(foot))):
        middle.extend(_family(rng, f"{shard_index:05d}-{number:04d}", size))
    while len(head) + len(middle) + len(foot) < images_per_shard:
        middle.append(PlannedImage(random_scene(rng)))
    plan = head + [middle[i] for i in rng.permutation(len(middle))] + foot
    base_keys = {
        item.family: shard_key(shard_index, index)
        for index, item in enumerate(plan)
        if item.family is not None and item.member == 0
    }
    if head:
        base_keys[head[0].family] = shard_key(shard_index - 1, images_per_shard - previous_kept)
    return [
        replace(item, variant_of=base_keys[item.family]) if item.member else item for item in plan
    ]


def shard_samples(
    seed: int, shard_index: int, images_per_shard: int, family_fraction: float = 0.7
) -> list[dict]:
    """Metadata of each sample of one shard (without pixels), in key order."""
    plan = plan_shard(seed, shard_index, images_per_shard, family_fraction)
    samples = []
    for index, item in enumerate(plan):
        key = shard_key(shard_index, index)
        caption_rng = np.random.default_rng([seed, CORPUS_STREAM, shard_index, 2, index])
        samples.append(
            {
                "key": key,
                "caption": caption_for_scene(item.scene, caption_rng),
                "status": "success",
                "error_message": None,
                "width": IMAGE_SIZE,
                "height": IMAGE_SIZE,
                "original_width": IMAGE_SIZE,
                "original_height": IMAGE_SIZE,
                "scene": item.scene,
                "family": item.family,
                "variant_of": item.variant_of,
                "edit": list(item.edit),
            }
        )
    return samples


def _tar_member(name: str, payload: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    """A tar entry with fixed owner, mode and time so equal content gives equal bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(payload), 0o644, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(payload)


def write_atomically(path: Path, write) -> Path:
    """Call ``write(file)`` on a hidden temporary file next to ``path``, then move it in place.

    The temporary name does not end in ``.tar``, so a sensor watching for shards never
    sees a half-written one.
    """
    handle, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".partial"
    )
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.chmod(temporary, 0o644)  # mkstemp's private mode is not what a shard needs
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_demo_shard(
    out_dir: str | os.PathLike,
    shard_index: int,
    images_per_shard: int = 500,
    seed: int = 0,
    family_fraction: float = 0.7,
) -> Path:
    """Write ``{shard_index:05d}.tar`` with KEY.jpg, KEY.txt and KEY.json per sample."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    members: list[tuple[str, bytes]] = []
    for index, sample in enumerate(
        shard_samples(seed, shard_index, images_per_shard, family_fraction)
    ):
        render_rng = np.random.default_rng([seed, CORPUS_STREAM, shard_index, 3, index])
        key = sample["key"]
        members.append((f"{key}.jpg", jpeg_bytes(render_scene(sample["scene"], render_rng))))
        members.append((f"{key}.json", json.dumps(sample).encode("utf-8")))
        members.append((f"{key}.txt", sample["caption"].encode("utf-8")))

    def write(file) -> None:
        with tarfile.open(fileobj=file, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, payload in sorted(members):
                tar.addfile(*_tar_member(name, payload))

    return write_atomically(out / f"{shard_index:05d}.tar", write)


def write_demo_corpus(
    out_dir: str | os.PathLike,
    num_shards: int = 4,
    images_per_shard: int = 500,
    seed: int = 0,
    family_fraction: float = 0.7,
) -> list[Path]:
    """Write shards 0..num_shards-1 of the demo corpus; returns the tar paths in order."""
    return [
        write_demo_shard(out_dir, shard, images_per_shard, seed, family_fraction)
        for shard in range(num_shards)
    ]
