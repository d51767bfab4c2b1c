"""``mmret_mllm`` on a tiny mined store: the demo's small random LLaVA-NeXT trained with LoRA on
the mined triplets (S1), continued on an MMEB-train copy in its official layout (S2), scored by
``benchmark_scores`` exactly as scoring the saved checkpoint directly; S2 skipped, saying what
to set, while MMEB-train is unset.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from dagster import AssetKey, DagsterEventType, EventRecordsFilter, materialize
from synthetic_shapes import shape_image

from megapairs_dagster.artifacts import artifact_relpath, load_artifact
from megapairs_dagster.assets.evaluation import build_scores_asset
from megapairs_dagster.assets.training_mllm import build_mllm_training_asset
from megapairs_dagster.definitions import defs
from megapairs_dagster.demo import write_demo_benchmark
from megapairs_dagster.evaluation.evaluate import evaluate_circo_format
from megapairs_dagster.evaluation.readers import read_circo
from megapairs_dagster.resources.profiles import MLLMRun
from megapairs_dagster.resources.settings import MLLMTraining
from megapairs_dagster.retrieval import MMRetMLLM
from megapairs_dagster.retrieval.mllm_configs import IMAGE_SIDE
from megapairs_dagster.retrieval.mmeb_train import composed_pairs, read_mmeb_train

pytestmark = pytest.mark.integration

RUNS = {"s1": MLLMRun(), "s2": MLLMRun(data="mmeb_train", start="s1")}
REPLACED = {AssetKey(name) for name in ("mmret_mllm", "mllm_benchmark_scores", "leaderboard")}


def _assets():
    return [*(a for a in defs.assets if not REPLACED & set(a.keys)),
            build_mllm_training_asset(RUNS),
            build_scores_asset("mllm_benchmark_scores", list(RUNS), ["demo_cir"])]


def _settings(**overrides) -> MLLMTraining:
    return MLLMTraining(image_side=IMAGE_SIDE, max_steps=2, batch_size=2, learning_rate=2e-3,
                        **overrides)


def _mmeb_train_copy(root: Path) -> Path:
    """Two subsets in MMEB-train's layout: CIRR's composed rows, and a text-target subset."""
    (root / "images").mkdir(parents=True)
    for name, (shape, colour) in {"a": ("circle", "red"), "b": ("square", "blue"),
                                  "c": ("triangle", "green")}.items():
        shape_image(shape, colour, "white", size=40).save(root / "images" / f"{name}.jpg")
    rows = {
        "CIRR": [("<|image_1|>\nGiven an image, find a similar one: make it blue", "images/a.jpg",
                  "<|image_1|>\nRepresent the given image.", "images/b.jpg"),
                 ("<|image_1|>\nFind: a triangle instead", "images/b.jpg", "", "images/c.jpg"),
                 ("<|image_1|>\nFind: in green", "images/a.jpg", "", "images/c.jpg")],
        "ImageNet_1K": [("<|image_1|>\nWhat is in the image?", "images/a.jpg", "circle", "")],
    }
    for subset, subset_rows in rows.items():
        (root / subset).mkdir()
        pd.DataFrame(subset_rows, columns=["qry", "qry_image_path", "pos_text", "pos_image_path"]
                     ).to_parquet(root / subset / "original-00000-of-00001.parquet")
    return root


def test_mmeb_train_reader_keeps_the_composed_examples(tmp_path):
    root = _mmeb_train_copy(tmp_path / "mmeb")
    pairs, counts = composed_pairs(read_mmeb_train(root), root)
    assert counts == {"CIRR_kept": 3, "ImageNet_1K_skipped": 1}
    assert pairs[0].instructions == ("Given an image, find a similar one: make it blue",)
    assert (pairs[0].query, pairs[0].target) == (str(root / "images/a.jpg"),
                                                 str(root / "images/b.jpg"))
    first, _ = composed_pairs(read_mmeb_train(root, subsets=["CIRR"], per_subset=2), root)
    assert len(first) == 2


def _skipped(instance, partition: str) -> list[str]:
    records = instance.get_event_records(EventRecordsFilter(
        DagsterEventType.ASSET_OBSERVATION, asset_key=AssetKey("mmret_mllm")))
    return [record.asset_observation.metadata["skipped"].value for record in records
            if record.asset_observation.partition == partition]


def test_mllm_stages_train_and_are_scored_like_mmret_clip(mined, tmp_path):
    resources, instance = mined
    client = resources["store"].client()

    # S2 before its data is set: nothing materialised, the setting to set said.
    skipped = materialize(_assets(), selection=["mmret_mllm"], partition_key="s2",
                          instance=instance, resources={**resources, "mllm_training": _settings()})
    assert skipped.success and not skipped.asset_materializations_for_node("mmret_mllm")
    assert "set mllm_training.mmeb_train" in _skipped(instance, "s2")[0]

    # S1 on the mined triplets.
    materialize(_assets(), selection=["mmret_mllm"], partition_key="s1", instance=instance,
                resources={**resources, "mllm_training": _settings()})
    record = load_artifact(client, artifact_relpath(["mmret_mllm"], "s1"))
    assert record["checkpoint"].startswith("mmret_mllm/s1/")
    assert record["start"]["kind"] == "mllm" and record["report"]["steps"] == 2
    assert record["data"]["triplets"] > 0 and record["training"]["caption_loss_weight"] == 0
    checkpoint = client.local_dir(record["checkpoint"])
    assert json.loads((checkpoint / "mmret_mllm.json").read_text())["lora_layout"] == "merged"

    # Scored on a (small) demo benchmark as the evaluation scores the checkpoint directly.
    bench = write_demo_benchmark(tmp_path / "bench", num_queries=12, gallery_size=60)
    client.upload_dir(bench, "demo_benchmark")
    scored = materialize(_assets(), selection=["mllm_benchmark_scores"],
                         partition_key="demo_cir|s1", instance=instance, resources=resources)
    (scores,) = scored.asset_materializations_for_node("mllm_benchmark_scores")
    assert scores.metadata["checkpoint"].value == record["checkpoint"]
    gallery = sorted(str(int(p.stem)) for p in (bench / "images").glob("*.jpg"))
    direct = evaluate_circo_format(
        MMRetMLLM.from_pretrained(checkpoint), read_circo(bench / "annotations" / "val.json"),
        gallery, lambda image_id: _open(bench, image_id))["all"]
    assert {name: scores.metadata[name].value for name in direct} == pytest.approx(direct)

    # S2 continues from S1's checkpoint on the MMEB-train copy.
    mmeb = _mmeb_train_copy(tmp_path / "mmeb")
    materialize(_assets(), selection=["mmret_mllm"], partition_key="s2", instance=instance,
                resources={**resources, "mllm_training": _settings(mmeb_train=str(mmeb))})
    second = load_artifact(client, artifact_relpath(["mmret_mllm"], "s2"))
    assert second["start"]["base_model"] == record["checkpoint"]
    assert second["data"]["examples"] == 3 and second["hard_negatives"] == "query"


def _open(bench: Path, image_id: str):
    from PIL import Image

    return Image.open(bench / "images" / f"{int(image_id):012d}.jpg").convert("RGB")
