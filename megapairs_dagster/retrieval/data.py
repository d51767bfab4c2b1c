"""Training examples for MMRet: (query image, one instruction, target, hard negatives), and
(image, caption) examples for the caption-only control.

Two sources of triplets: rows of the ``triplets`` table (images opened by a caller-given
loader, e.g. ``ExportedImages`` over the pipeline's own export), or a file in the released
MegaPairs format.

Per item and step, as the MegaPairs dataset card says, ONE instruction is drawn at random
from the pair's list. Hard negatives: the query image is always the first (the released
data puts it first, so the model learns not to return the reference image itself); it is
not loaded twice: the trainer reuses the query image's embedding. The other
``hard_negatives - 1`` are drawn without replacement from the rest of the list; a shorter
list is padded by drawing again with replacement (and a pair with no other negative repeats
the query image). Every draw comes from a generator seeded by (seed, epoch, index), so an
item is the same in every process, DataLoader worker and resumed run.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass

import fsspec
import numpy as np
import pandas as pd
import torch
from PIL import Image

from megapairs_dagster.retrieval.defaults import DEFAULT_HARD_NEGATIVES
from megapairs_dagster.synthesis.megapairs_format import image_relpath, read_megapairs


def triplets_from_views(frame, views: Collection[str] | None):
    """The triplets mined by at least one of ``views`` (all of them when None): the paper's
    Table 5 ablation trains on one view's pairs, or a combination's."""
    if views is None:
        return frame
    wanted = set(views)
    return frame[[bool(wanted & set(found or ())) for found in frame["views"]]].reset_index(drop=True)


def nested_subset(frame, fraction: float | None):
    """The triplets whose (query, target) pair hashes below ``fraction`` (all when None).

    A pair's hash does not depend on the other rows, so a smaller fraction's subset lies
    inside every larger one's, and the points of a scaling curve differ only by the data
    added. pandas' row hash uses a fixed key: the same pairs on every machine and run.
    """
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"triplets_fraction must be in (0, 1], got {fraction}")
    if fraction is None or fraction == 1:
        return frame
    hashes = pd.util.hash_pandas_object(frame[["query_id", "target_id"]], index=False)
    threshold = np.uint64(int(fraction * 2**64))
    return frame[hashes.to_numpy() < threshold].reset_index(drop=True)


@dataclass(frozen=True)
class PairExample:
    """One pair; image keys are whatever the source's image loader understands."""

    query: Hashable
    instructions: tuple[str, ...]
    target: Hashable
    negatives: tuple[Hashable, ...]  # excluding the query image


class _ImageBytesLoader:
    """Picklable loader over a caller's ``image_bytes`` (DataLoader workers call it)."""

    def __init__(self, image_bytes: Callable[[int], bytes]):
        self.image_bytes = image_bytes

    def __call__(self, image_id: int) -> Image.Image:
        return Image.open(io.BytesIO(self.image_bytes(int(image_id)))).convert("RGB")


class _UrlLoader:
    def __init__(self, storage_options: dict | None):
        self.storage_options = storage_options or {}

    def __call__(self, url: str) -> Image.Image:
        with fsspec.open(url, "rb", **self.storage_options) as handle:
            return Image.open(io.BytesIO(handle.read())).convert("RGB")


class ExportedImages:
    """The images of a MegaPairs export (``images/<id>.jpg`` under ``export_url``) by image id.

    Each DataLoader worker opens the images its items need when it needs them, so a
    training process holds no more of the data than its pixel cache, however large the
    export grows.
    """

    def __init__(self, export_url: str, storage_options: dict | None = None):
        self.export_url = export_url.rstrip("/")
        self._open = _UrlLoader(storage_options)

    def __call__(self, image_id: int) -> Image.Image:
        url = f"{self.export_url}/{image_relpath(int(image_id))}"
        try:
            return self._open(url)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"image {image_id} is not in the export {self.export_url}: materialise "
                "megapairs_export after the triplets that reference it"
            ) from error


class ImagePixels:
    """Preprocessed pixels by image key, keeping the last ``cache_images`` in memory.

    A triplet step decodes ~5 images per sample, and a small corpus reuses each image many
    times per epoch: decoding again was a third of a demo CPU step (bench/train.py).
    Each DataLoader worker holds its own cache; 0 turns caching off.
    """

    def __init__(
        self,
        load_image: Callable[[Hashable], Image.Image],
        preprocess: Callable[[Image.Image], torch.Tensor],
        cache_images: int = 0,
    ):
        if cache_images < 0:
            raise ValueError("cache_images must be >= 0")
        self.load_image = load_image
        self.preprocess = preprocess
        self.cache_images = cache_images
        self._cache: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    def __call__(self, key: Hashable) -> torch.Tensor:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        pixels = self.preprocess(self.load_image(key))
        if self.cache_images:
            self._cache[key] = pixels
            if len(self._cache) > self.cache_images:
                self._cache.popitem(last=False)
        return pixels


def _epoch_key(key: int | tuple[int, int]) -> tuple[int, int]:
    return key if isinstance(key, tuple) else (0, key)


class CaptionSet(torch.utils.data.Dataset):
    """(image, caption) items for training on captions alone (the equal-compute control).

    Items are keyed like ``MMRetTrainingSet``'s and hold ``image`` pixels and ``caption``
    tokens; the trainer then optimises only the image-caption term.
    """

    has_captions = True

    def __init__(
        self,
        captions: Mapping[Hashable, str],
        load_image: Callable[[Hashable], Image.Image],
        *,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        cache_images: int = 0,
    ):
        empty = [key for key, caption in captions.items() if not str(caption).strip()]
        if empty:
            raise ValueError(f"{len(empty)} image(s) have an empty caption, e.g. {empty[:3]}")
        self.keys = list(captions)
        self.captions = dict(captions)
        self.pixels = ImagePixels(load_image, preprocess, cache_images)
        self.tokenizer = tokenizer

    @classmethod
    def from_image_bytes(
        cls, captions: Mapping[int, str], image_bytes: Callable[[int], bytes], **options
    ) -> CaptionSet:
        return cls(captions, _ImageBytesLoader(image_bytes), **options)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        image_key = self.keys[_epoch_key(key)[1]]
        return {
            "image": self.pixels(image_key),
            "caption": self.tokenizer([self.captions[image_key]])[0],
        }


class MMRetTrainingSet(torch.utils.data.Dataset):
    """Items keyed by ``(epoch, index)`` (a plain ``index`` means epoch 0).

    An item holds ``query`` pixels, ``instruction`` tokens, ``positive`` pixels,
    ``negatives`` pixels [hard_negatives - 1, C, H, W] (the query image, the first hard
    negative, is not repeated) and, when captions are given, the query's ``caption`` tokens
    (for the optional image-caption alignment term).
    """

    def __init__(
        self,
        examples: list[PairExample],
        load_image: Callable[[Hashable], Image.Image],
        *,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        hard_negatives: int = DEFAULT_HARD_NEGATIVES,
        captions: Mapping[Hashable, str] | None = None,
        seed: int = 0,
        cache_images: int = 0,
    ):
        if hard_negatives < 1:
            raise ValueError("hard_negatives counts the query image, so it must be >= 1")
        if captions is not None:
            missing = [example.query for example in examples if example.query not in captions]
            if missing:
                raise ValueError(f"no caption for {len(missing)} query image(s), e.g. {missing[:3]}")
        self.examples = examples
        self.pixels = ImagePixels(load_image, preprocess, cache_images)
        self.tokenizer = tokenizer
        self.hard_negatives = hard_negatives
        self.captions = None if captions is None else {e.query: captions[e.query] for e in examples}
        self.seed = seed

    @classmethod
    def from_triplets(
        cls, frame, load_image: Callable[[int], Image.Image], **options
    ) -> MMRetTrainingSet:
        """Rows of the ``triplets`` table (``TripletStore.triplets_frame``); ``captions`` (if
        given) maps image_id -> caption."""
        examples = [
            PairExample(
                query=int(query),
                instructions=tuple(instructions),
                target=int(target),
                negatives=tuple(int(n) for n in negatives if int(n) != int(query)),
            )
            for query, target, instructions, negatives in zip(
                frame["query_id"], frame["target_id"], frame["instructions"],
                frame["hard_negative_ids"],
            )
        ]
        return cls(examples, load_image, **options)

    @classmethod
    def from_megapairs(
        cls, path_or_url: str, *, storage_options: dict | None = None, **options
    ) -> MMRetTrainingSet:
        """A released-format ``.jsonl``/``.parquet``; ``captions`` maps q_img (as written in
        the file) -> caption."""
        examples = []
        captions = options.pop("captions", None)
        resolved_captions = None if captions is None else {}
        for record in read_megapairs(path_or_url, storage_options=storage_options):
            query = record.resolve(record.q_img)
            examples.append(
                PairExample(
                    query=query,
                    instructions=tuple(record.q_text),
                    target=record.resolve(record.t_img),
                    negatives=tuple(record.resolve(h) for h in record.hns if h != record.q_img),
                )
            )
            if captions is not None and record.q_img in captions:
                resolved_captions[query] = captions[record.q_img]
        return cls(
            examples, _UrlLoader(storage_options), captions=resolved_captions, **options
        )

    @property
    def has_captions(self) -> bool:
        return self.captions is not None

    def __len__(self) -> int:
        return len(self.examples)

    def draw(self, epoch: int, index: int) -> tuple[str, list[Hashable]]:
        """The instruction and the non-query hard negatives of item ``index`` in ``epoch``."""
        example = self.examples[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        instruction = example.instructions[rng.integers(len(example.instructions))]
        wanted = self.hard_negatives - 1
        pool = list(example.negatives) or [example.query]
        if len(pool) >= wanted:
            picks = rng.choice(len(pool), size=wanted, replace=False)
        else:
            padding = rng.choice(len(pool), size=wanted - len(pool), replace=True)
            picks = np.concatenate([np.arange(len(pool)), padding])
        return instruction, [pool[int(i)] for i in picks]

    def _tokens(self, text: str) -> torch.Tensor:
        return self.tokenizer([text])[0]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = _epoch_key(key)
        example = self.examples[index]
        instruction, negatives = self.draw(epoch, index)
        query = self.pixels(example.query)
        item = {
            "query": query,
            "instruction": self._tokens(instruction),
            "positive": self.pixels(example.target),
            "negatives": torch.stack([self.pixels(n) for n in negatives])
            if negatives
            else query.new_empty(0, *query.shape),
        }
        if self.captions is not None:
            item["caption"] = self._tokens(self.captions[example.query])
        return item
