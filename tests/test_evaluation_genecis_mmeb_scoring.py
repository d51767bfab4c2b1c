"""GeneCIS and MMEB scored from a model through ``benchmark_scores``: tiny folders in the
official layouts, a seeded tiny demo CLIP, and the expected metrics computed here from the
model's own embeddings, one input at a time, then scored by the official-rule scorers; and the
partitions of a deployment without their data, skipped with a note on the partition."""

import base64
import io
import json
import re
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import small_demo_resources
from dagster import DagsterInstance, MultiPartitionKey, materialize
from PIL import Image

from megapairs_dagster.definitions import build_definitions
from megapairs_dagster.evaluation.datasets import load_mmeb
from megapairs_dagster.evaluation.evaluate import evaluate_mmeb
from megapairs_dagster.evaluation.examples import picture_size
from megapairs_dagster.evaluation.genecis import (
    GENECIS_TASKS,
    genecis_task_metrics,
    load_genecis_image,
    read_genecis,
)
from megapairs_dagster.evaluation.mmeb import MMEB_DATASETS, mmeb_metrics, read_mmeb_dataset
from megapairs_dagster.resources.profiles import load_deployment
from megapairs_dagster.resources.settings import BenchmarkData
from megapairs_dagster.retrieval import MMRetCLIP
from megapairs_dagster.synthesis.triplet_store import TripletStore

PAPER_ASSETS = list(build_definitions(load_deployment("paper")).assets)
CHECKPOINT = "models/tiny"


def _noise(path, seed: int, size=(40, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    MMRetCLIP.from_open_clip("megapairs-demo-clip", None).save_pretrained(folder)
    return folder


def _score(tmp_path, tiny_model_dir, benchmark: str, data: BenchmarkData, **kwargs):
    """Materialise ``benchmark|base_encoder`` with a record naming the tiny checkpoint."""
    resources = small_demo_resources(tmp_path / "home")
    resources["benchmark_data"] = data
    client = resources["store"].client()
    for file in tiny_model_dir.iterdir():
        client.write_bytes(f"{CHECKPOINT}/{file.name}", file.read_bytes())
    client.write_bytes("mmret_clip/base_encoder.json",
                       json.dumps({"checkpoint": CHECKPOINT, "start": {}}).encode())
    result = materialize(PAPER_ASSETS, selection=["benchmark_scores"], resources=resources,
                         partition_key=MultiPartitionKey({"benchmark": benchmark,
                                                          "model": "base_encoder"}), **kwargs)
    return result, TripletStore(client).scores_frame()


def _metadata(result) -> dict:
    (materialization,) = result.asset_materializations_for_node("benchmark_scores")
    return {name: getattr(value, "value", value)
            for name, value in materialization.metadata.items()}


def _picture(markdown: str) -> Image.Image:
    (data,) = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", markdown)
    return Image.open(io.BytesIO(base64.b64decode(data)))


def _group_values(scores, benchmark: str, metric: str) -> dict[str, float]:
    rows = scores[(scores["benchmark"] == benchmark) & (scores["metric"] == metric)]
    return dict(zip(rows["query_group"], rows["value"]))


def _best_first(scores: list[float]) -> list[int]:
    """Indices by descending score, equal scores in index order (Python's sort is stable)."""
    return sorted(range(len(scores)), key=lambda index: -scores[index])


# --- GeneCIS --------------------------------------------------------------------------------


def _vg(image_id: int, box) -> dict:
    return {"image_id": str(image_id), "instance_bbox": box, "object_name": "thing"}


@pytest.fixture
def genecis_folder(tmp_path):
    """The GeneCIS repository's genecis/<task>.json, COCO's val2017/ and VG's VG_100K_all/:
    two queries a task, four distractors each (change_object's last query lists its target
    among them too, as the official file's query 19 does); each task's first target shows the
    reference's image again, so a model can find it."""
    root = tmp_path / "genecis_data"
    for task in GENECIS_TASKS:
        records = []
        for q in range(2):
            base = 100 * GENECIS_TASKS.index(task) + 10 * q
            if task.endswith("attribute"):
                item = lambda n: _vg(5000 + n, [3 + n % 5, 4.5, 11, 9])
            else:
                item = lambda n: {"val_image_id": 7000 + n}
            distractors = [item(base + 2 + d) for d in range(4)]
            if task == "change_object" and q == 1:
                distractors[2] = item(base + 1)
            records.append({"reference": item(base), "target": item(base + 1),
                            "condition": f"{task.split('_')[1]} {q}", "gallery": distractors})
        path = root / "genecis" / f"{task}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records))
        for query in read_genecis(path):
            folder = root / ("val2017" if query.target.box is None else "VG_100K_all")
            for entry in (query.reference, query.target, *query.distractors):
                _noise(folder / entry.file_name, seed=int(entry.image_id), size=(48, 40))
            if query.query_id == "0":  # the first target is the reference's image again
                (folder / query.target.file_name).write_bytes(
                    (folder / query.reference.file_name).read_bytes())
    return root


def _expected_genecis(model: MMRetCLIP, root) -> dict[str, float]:
    queries, rankings = {}, {}
    for task in GENECIS_TASKS:
        queries[task] = read_genecis(root / "genecis" / f"{task}.json")
        folder = root / ("VG_100K_all" if task.endswith("attribute") else "val2017")
        items = {item.item_id: item for query in queries[task]
                 for item in (query.reference, query.target, *query.distractors)}
        rankings[task] = {}
        for query in queries[task]:
            composed = model.encode(images=[load_genecis_image(folder, query.reference)],
                                    text=[query.condition])[0]
            ids = query.gallery_ids
            gallery = model.encode(images=[load_genecis_image(folder, items[i]) for i in ids])
            scores = (gallery @ composed).tolist()
            rankings[task][query.query_id] = [ids[index] for index in _best_first(scores)]
    return genecis_task_metrics(queries, rankings)


def test_genecis_is_scored_from_the_model_as_the_official_rules_say(tmp_path, genecis_folder,
                                                                    tiny_model_dir):
    data = BenchmarkData(genecis_annotations=str(genecis_folder),
                         genecis_coco_images=str(genecis_folder / "val2017"),
                         genecis_vg_images=str(genecis_folder / "VG_100K_all"))
    result, scores = _score(tmp_path, tiny_model_dir, "genecis", data)
    expected = _expected_genecis(MMRetCLIP.from_pretrained(tiny_model_dir), genecis_folder)
    metadata = _metadata(result)
    assert {k: metadata[k] for k in ("R@1", "R@2", "R@3")} == pytest.approx(
        {f"R@{k}": expected[f"avg/R@{k}"] for k in (1, 2, 3)})
    for k in (1, 2, 3):
        assert _group_values(scores, "genecis", f"R@{k}") == pytest.approx(
            {"all": expected[f"avg/R@{k}"],
             **{task: expected[f"{task}/R@{k}"] for task in GENECIS_TASKS}})
    # a random model ranks some targets first and misses others
    assert 0 < expected["avg/R@1"] < expected["avg/R@3"] < 100
    # the first three queries ranked (two tasks), each with its top 5 of 5 gallery ids
    assert _picture(metadata["examples"]).size == picture_size(3)


def test_genecis_missing_vg_image_is_named_before_any_model_loads(tmp_path, genecis_folder,
                                                                  tiny_model_dir):
    (genecis_folder / "VG_100K_all" / "5012.jpg").unlink()
    data = BenchmarkData(genecis_annotations=str(genecis_folder),
                         genecis_coco_images=str(genecis_folder / "val2017"),
                         genecis_vg_images=str(genecis_folder / "VG_100K_all"))
    result, _ = _score(tmp_path, tiny_model_dir, "genecis", data, raise_on_error=False)
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    assert ("VG_100K_all (Visual Genome, <image_id>.jpg): 1 images referenced by the "
            "annotations are missing, e.g. ['5012.jpg']") in str(failure.step_failure_data.error)


# --- MMEB -----------------------------------------------------------------------------------

TOKEN = "<|image_1|>\n"


def _mmeb_row(dataset: str) -> dict:
    """A row of three candidates (the positive first) in the shape of its meta-task's rows:
    classification and VQA (image query, text candidates), retrieval (text query, image
    candidates), grounding (image query, image candidates whose text is the placeholder).
    Every other dataset of a meta-task repeats a row, inputs and all (embedded once)."""
    meta_task = MMEB_DATASETS[dataset][0]
    variant = f"{meta_task}{list(MMEB_DATASETS).index(dataset) % 2}"
    images = [f"{variant}/{n}.jpg" for n in range(4)]
    if meta_task in ("classification", "vqa"):
        query = (f"{TOKEN}Represent the given image for {meta_task}", images[0])
        candidates = [(f"label {variant} {n}", "") for n in range(3)]
    elif meta_task == "retrieval":
        query = (f"Find an image of thing {variant}", "")
        candidates = [(f"{TOKEN}Represent the given image.", image) for image in images[1:]]
    else:
        query = (f"{TOKEN}Select the portion of the image that shows {variant}", images[0])
        candidates = [(TOKEN, image) for image in images[1:]]
    return {"qry_text": query[0], "qry_img_path": query[1],
            "tgt_text": [text for text, _ in candidates],
            "tgt_img_path": [path for _, path in candidates]}


def _write_mmeb(root, datasets) -> None:
    """MMEB-eval's <dataset>/test-00000-of-00001.parquet, and the images unpacked in
    eval_images/."""
    for dataset in datasets:
        row = _mmeb_row(dataset)
        (root / dataset).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist([row]),
                       root / dataset / "test-00000-of-00001.parquet")
        for path in filter(None, (row["qry_img_path"], *row["tgt_img_path"])):
            _noise(root / "eval_images" / path, seed=zlib.crc32(path.encode()))


def _expected_mmeb(embed, root, datasets) -> dict[str, float]:
    """The official rule from ``embed(text, image path)``, one input at a time."""
    queries, chosen = {}, {}
    for dataset in datasets:
        queries[dataset] = read_mmeb_dataset(root, dataset)
        chosen[dataset] = {}
        for query in queries[dataset]:
            composed = embed(query.text, query.image_path)
            scores = [float(embed(*candidate) @ composed) for candidate in query.candidates]
            chosen[dataset][query.query_id] = _best_first(scores)[0]
    return mmeb_metrics(queries, chosen)


def _inputs(text: str, image: str, images) -> dict:
    """What a model is given for an MMEB input: the text without the placeholder, the image."""
    text = text.replace("<|image_1|>", "").strip()
    return {"images": [Image.open(images / image).convert("RGB")] if image else None,
            "text": [text] if text or not image else None}


def _as_rows(expected: dict[str, float]) -> dict[str, float]:
    return {("all" if name == "overall/hit@1" else name.removesuffix("/hit@1")): value
            for name, value in expected.items()}


ONE_PER_META_TASK = ["ImageNet-1K", "OK-VQA", "MSCOCO_t2i", "MSCOCO"]


def test_mmeb_is_scored_from_the_model_as_the_official_rules_say(tmp_path, tiny_model_dir):
    """Four datasets, one of each meta-task: no group is complete, so no mean is reported."""
    root = tmp_path / "MMEB-eval"
    _write_mmeb(root, ONE_PER_META_TASK)
    data = BenchmarkData(mmeb_data=str(root), mmeb_images=str(root / "eval_images"))
    result, scores = _score(tmp_path, tiny_model_dir, "mmeb", data)
    model = MMRetCLIP.from_pretrained(tiny_model_dir)
    expected = _expected_mmeb(
        lambda text, image: model.encode(**_inputs(text, image, root / "eval_images"))[0],
        root, ONE_PER_META_TASK)
    assert sorted(expected) == sorted(f"{dataset}/hit@1" for dataset in ONE_PER_META_TASK)
    assert 0 < sum(expected.values()) < 400  # some right, some wrong
    metadata = _metadata(result)
    assert "hit@1" not in metadata  # no overall from 4 of 36 datasets
    assert _group_values(scores, "mmeb", "hit@1") == pytest.approx(_as_rows(expected))
    assert _picture(metadata["examples"]).size == picture_size(3)


class ContentEncoder:
    """A unit vector seeded by each input's pixels and text: equal inputs embed equally,
    composed inputs differ from their parts, and nothing is learnt."""

    def encode(self, images=None, text=None) -> torch.Tensor:
        count = len(images if images is not None else text)
        rows = []
        for i in range(count):
            key = (images[i].tobytes() if images is not None else b"") + b"|" + (
                text[i].encode() if text is not None else b"-")
            vector = np.random.default_rng(zlib.crc32(key)).normal(size=16)
            rows.append(vector / np.linalg.norm(vector))
        return torch.tensor(np.array(rows), dtype=torch.float32)


def test_mmeb_overall_and_groups_from_all_36_datasets(tmp_path):
    root = tmp_path / "MMEB-eval"
    _write_mmeb(root, MMEB_DATASETS)
    model = ContentEncoder()
    queries, load = load_mmeb(root, root / "eval_images")
    metrics = evaluate_mmeb(model, queries, load)
    expected = _expected_mmeb(
        lambda text, image: model.encode(**_inputs(text, image, root / "eval_images"))[0],
        root, MMEB_DATASETS)
    assert {group: values["hit@1"] for group, values in metrics.items()} == pytest.approx(
        _as_rows(expected))
    assert {"classification", "vqa", "retrieval", "grounding", "ind", "ood"} <= set(metrics)
    assert 0 < metrics["all"]["hit@1"] < 100


# --- not configured -------------------------------------------------------------------------


@pytest.mark.parametrize("benchmark, data, settings", [
    ("genecis", BenchmarkData(genecis_annotations="/g", genecis_coco_images="/c"),
     "benchmark_data.genecis_vg_images"),
    ("mmeb", BenchmarkData(), "benchmark_data.mmeb_data and benchmark_data.mmeb_images"),
])
def test_unconfigured_genecis_and_mmeb_are_skipped_with_a_note_on_the_partition(
        tmp_path, tiny_model_dir, benchmark, data, settings):
    instance = DagsterInstance.ephemeral()
    result, scores = _score(tmp_path, tiny_model_dir, benchmark, data, instance=instance)
    assert result.success and scores.empty
    assert not result.asset_materializations_for_node("benchmark_scores")
    (observation,) = result.asset_observations_for_node("benchmark_scores")
    assert observation.partition == f"{benchmark}|base_encoder"
    assert observation.metadata["skipped"].value == (
        f"{benchmark} data not configured: set {settings}")
