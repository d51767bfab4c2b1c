"""Official CIRCO, CIRR, FashionIQ, GeneCIS and MMEB data on disk: the annotation files, and the image files
they name.

Everything a scoring run reads is located and checked here, before any model is loaded: a
missing folder, file or image is a BenchmarkInputError naming the path, not a failure half-way
through embedding a gallery. The loaders return what the evaluators in ``evaluate`` take.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image

from megapairs_dagster.evaluation.genecis import (
    GENECIS_TASKS,
    GenecisQuery,
    find_genecis_file,
    load_genecis_image,
    read_genecis,
)
from megapairs_dagster.evaluation.mmeb import MMEB_DATASETS, MmebQuery, read_mmeb_dataset
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
    files = _image_files(ids, locate, where)
    return lambda image_id: Image.open(files[image_id]).convert("RGB")


def _image_files(ids: Iterable[str], locate: Callable[[str], Path | None],
                 where: str) -> dict[str, Path]:
    """The file of every id of ``ids``; a BenchmarkInputError counting the missing ones."""
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
    return files


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


def load_genecis(annotations: str | Path, coco_images: str | Path, vg_images: str | Path
                 ) -> tuple[dict[str, list[GenecisQuery]], ImageLoader]:
    """Queries of GeneCIS's four tasks, and a loader of any of their items by ``item_id``: the
    COCO val2017 image (object tasks) or the official crop of a Visual Genome box (attribute
    tasks), every image file checked first.

    ``annotations`` holds the four ``<task>.json`` (directly or in ``genecis/``);
    ``coco_images`` is val2017, ``vg_images`` the VG 1.2 images (``VG_100K_all``).
    """
    annotations = _folder(annotations)
    queries = {task: read_genecis(find_genecis_file(annotations, task)) for task in GENECIS_TASKS}
    items = {item.item_id: item for task_queries in queries.values() for query in task_queries
             for item in (query.reference, query.target, *query.distractors)}
    folders = {}
    for is_coco, images, where in ((True, coco_images, "val2017, NNNNNNNNNNNN.jpg"),
                                   (False, vg_images, "Visual Genome, <image_id>.jpg")):
        folder = _folder(images)
        names = [item.file_name for item in items.values() if (item.box is None) == is_coco]
        _image_files(names, lambda name, folder=folder: folder / name, f"{folder} ({where})")
        folders[is_coco] = folder
    return queries, lambda item_id: load_genecis_image(
        folders[items[item_id].box is None], items[item_id])


def load_mmeb(data: str | Path, images: str | Path
              ) -> tuple[dict[str, list[MmebQuery]], ImageLoader]:
    """The test queries of every MMEB v1 dataset ``data`` holds (one folder per dataset, the
    MMEB-eval layout), and a loader of their images by path relative to ``images``, every
    image file checked first."""
    data = _folder(data)
    datasets = [dataset for dataset in MMEB_DATASETS if (data / dataset).is_dir()]
    if not datasets:
        raise BenchmarkInputError(f"{data}: none of the MMEB v1 datasets' folders is here "
                                  f"(expected e.g. {data / 'ImageNet-1K'})")
    queries = {dataset: read_mmeb_dataset(data, dataset) for dataset in datasets}
    paths = [path for dataset_queries in queries.values() for query in dataset_queries
             for path in (query.image_path, *(image for _, image in query.candidates)) if path]
    folder = _folder(images)
    return queries, _image_loader(paths, lambda path: folder / path,
                                  f"{folder} (qry_img_path, tgt_img_path)")
