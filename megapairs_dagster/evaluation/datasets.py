"""Official CIRCO, CIRR and FashionIQ data on disk: the annotation files, and the image files
they name.

Everything a scoring run reads is located and checked here, before any model is loaded: a
missing folder, file or image is a BenchmarkInputError naming the path, not a failure half-way
through embedding a gallery. The loaders return what the evaluators in ``evaluate`` take.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image

from megapairs_dagster.evaluation.readers import (
    FASHIONIQ_CATEGORIES,
    BenchmarkInputError,
    CirQuery,
    read_circo,
    read_cirr,
    read_cirr_split,
    read_fashioniq,
    read_fashioniq_gallery,
)

# CLIP4Cir's copy of FashionIQ ships <asin>.png (MegaPairs reads those); the crawl gave .jpg.
FASHIONIQ_IMAGE_SUFFIXES = (".png", ".jpg")

ImageLoader = Callable[[str], Image.Image]


def find_annotation_file(folder: str | Path, name: str) -> Path:
    """``name`` in ``folder``, or in its ``captions/`` or ``image_splits/`` as the official
    CIRR and FashionIQ repositories lay their files out."""
    folder = Path(folder)
    for candidate in (folder / name, folder / "captions" / name, folder / "image_splits" / name):
        if candidate.is_file():
            return candidate
    raise BenchmarkInputError(f"{folder}: no file {name} here or in captions/ or image_splits/")


def _folder(path: str | Path) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise BenchmarkInputError(f"{folder}: folder not found")
    return folder


def _image_loader(ids: Iterable[str], locate: Callable[[str], Path | None],
                  where: str) -> ImageLoader:
    """Open the file of an id as RGB, once every id of ``ids`` is known to have one."""
    files: dict[str, Path] = {}
    missing = []
    for image_id in dict.fromkeys(ids):
        path = locate(image_id)
        if path is None or not path.is_file():
            missing.append(image_id)
        else:
            files[image_id] = path
    if missing:
        raise BenchmarkInputError(
            f"{where}: {len(missing)} images referenced by the annotations are missing, "
            f"e.g. {missing[:5]}")
    return lambda image_id: Image.open(files[image_id]).convert("RGB")


def is_test_split(split: str) -> bool:
    """Whether ``split`` is a test split (CIRCO ``test``, CIRR ``test1``): its queries have no
    ground truths, which a test server keeps, and the readers refuse any that has one."""
    return split.startswith("test")


def load_circo(annotations: str | Path, images: str | Path,
               split: str = "val") -> tuple[list[CirQuery], list[str], ImageLoader]:
    """Queries, gallery ids and image loader of CIRCO ``split`` (``val`` or ``test``).

    ``annotations`` is the split's file (``val.json``, ``test.json``) or the folder holding it;
    ``images`` holds the COCO unlabeled2017 images (``000000271520.jpg``), all of which are the
    gallery of both splits, ordered by id as text. Every reference must be among them.
    """
    path = Path(annotations)
    if not path.is_file():
        path = find_annotation_file(_folder(path), f"{split}.json")
    queries = read_circo(path, ground_truth=not is_test_split(split))
    folder = _folder(images)
    files = {str(int(file.stem)): file for file in folder.glob("*.jpg") if file.stem.isdigit()}
    missing = [query.reference_id for query in queries if query.reference_id not in files]
    if missing:
        raise BenchmarkInputError(
            f"{folder} (NNNNNNNNNNNN.jpg): {len(missing)} images referenced by the annotations "
            f"are missing, e.g. {missing[:5]}")
    return queries, sorted(files), lambda image_id: Image.open(files[image_id]).convert("RGB")


def load_cirr(annotations: str | Path, images: str | Path,
              split: str = "val") -> tuple[list[CirQuery], list[str], ImageLoader]:
    """Queries, gallery names and image loader of CIRR rc2 ``split`` (``val``, ``test1``).

    ``annotations`` holds ``cap.rc2.<split>.json`` and ``split.rc2.<split>.json``; ``images``
    is the folder the split file's paths are relative to, CIRR's ``img_raw`` holding ``dev/``
    and ``test1/`` of NLVR2 images (``./dev/dev-244-0-img0.png``, ``./test1/...``). The gallery
    is the split file, in its order.
    """
    annotations = _folder(annotations)
    queries = read_cirr(find_annotation_file(annotations, f"cap.rc2.{split}.json"),
                        ground_truth=not is_test_split(split))
    split_file = find_annotation_file(annotations, f"split.rc2.{split}.json")
    paths = read_cirr_split(split_file)
    folder = _folder(images)
    load = _image_loader(
        [*paths, *(query.reference_id for query in queries)],
        lambda name: folder / paths[name] if name in paths else None,
        f"{folder} (paths from {split_file})",
    )
    return queries, list(paths), load


def load_fashioniq(
    annotations: str | Path, images: str | Path, split: str = "val"
) -> tuple[dict[str, list[CirQuery]], dict[str, list[str]], ImageLoader]:
    """Queries and gallery ids per category, and the image loader, of FashionIQ ``split``.

    ``annotations`` holds ``cap.<category>.<split>.json`` and ``split.<category>.<split>.json``
    for dress, shirt and toptee; ``images`` holds ``<asin>.png`` or ``<asin>.jpg``.
    """
    annotations = _folder(annotations)
    queries, galleries = {}, {}
    for category in FASHIONIQ_CATEGORIES:
        queries[category] = read_fashioniq(
            find_annotation_file(annotations, f"cap.{category}.{split}.json"))
        galleries[category] = read_fashioniq_gallery(
            find_annotation_file(annotations, f"split.{category}.{split}.json"))
    folder = _folder(images)
    # One listing rather than a lookup per image; the first suffix listed wins.
    files = {path.stem: path for suffix in reversed(FASHIONIQ_IMAGE_SUFFIXES)
             for path in folder.glob(f"*{suffix}")}
    needed = [image_id for category in FASHIONIQ_CATEGORIES
              for image_id in (*galleries[category], *(q.reference_id for q in queries[category]))]
    load = _image_loader(needed, files.get, f"{folder} (<asin>.png or .jpg)")
    return queries, galleries, load
