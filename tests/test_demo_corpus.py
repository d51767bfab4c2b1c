"""The procedural demo corpus, its relations and the demo CIR benchmark."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter, defaultdict
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from megapairs_dagster.demo import (
    GALLERY_ID_OFFSET,
    RELATION_TYPES,
    attribute_differences,
    shard_samples,
    write_demo_benchmark,
    write_demo_corpus,
    write_demo_shard,
)
from megapairs_dagster.demo.relations import scene_signature
from megapairs_dagster.demo.render import IMAGE_SIZE, render_scene
from megapairs_dagster.demo.scenes import (
    BACKGROUNDS,
    EDIT_TO_RELATION,
    EDIT_TYPES,
    OBJECT_COLOURS,
    POSITIONS,
)

SMALL_SHARD = 40


def _digests(paths) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _obj(shape="circle", colour="red", size="large", position="left", texture="solid") -> dict:
    return {
        "shape": shape,
        "colour": colour,
        "size": size,
        "position": position,
        "texture": texture,
    }


@pytest.fixture(scope="module")
def samples_by_key() -> dict[str, dict]:
    """Metadata of six shards of 100 images (no pixels: planning alone is fast)."""
    return {s["key"]: s for shard in range(6) for s in shard_samples(0, shard, 100)}


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    root = write_demo_benchmark(
        tmp_path_factory.mktemp("bench"), num_queries=40, gallery_size=250, seed=7
    )
    queries = json.loads((root / "annotations" / "val.json").read_text())
    lines = (root / "metadata.jsonl").read_text().splitlines()
    scenes = {entry["image_id"]: entry["scene"] for entry in map(json.loads, lines)}
    return root, queries, scenes


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    first = _digests(
        write_demo_corpus(tmp_path / "a", num_shards=2, images_per_shard=SMALL_SHARD, seed=3)
    )
    again = _digests(
        write_demo_corpus(tmp_path / "b", num_shards=2, images_per_shard=SMALL_SHARD, seed=3)
    )
    other = _digests(
        write_demo_corpus(tmp_path / "c", num_shards=2, images_per_shard=SMALL_SHARD, seed=4)
    )
    assert first == again
    assert list(first) == ["00000.tar", "00001.tar"]
    assert all(first[name] != other[name] for name in first)


def test_tar_layout_matches_img2dataset(tmp_path):
    (path,) = write_demo_corpus(tmp_path, num_shards=1, images_per_shard=SMALL_SHARD, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar"]  # no temporary left
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names)
        assert all(m.mtime == 0 and m.uid == 0 and m.isfile() for m in members)
        keys = [f"00000{i:04d}" for i in range(SMALL_SHARD)]
        assert names == [f"{k}.{ext}" for k in keys for ext in ("jpg", "json", "txt")]
        for key in keys[:5]:
            meta = json.loads(tar.extractfile(f"{key}.json").read())
            caption = tar.extractfile(f"{key}.txt").read().decode("utf-8")
            image = Image.open(io.BytesIO(tar.extractfile(f"{key}.jpg").read()))
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (meta["width"], meta["height"]) == (IMAGE_SIZE, IMAGE_SIZE)
            assert meta["key"] == key and meta["status"] == "success"
            assert meta["caption"] == caption
            assert {"scene", "family", "variant_of", "edit"} <= meta.keys()
            assert 1 <= len(meta["scene"]["objects"]) <= 3


def test_captions_name_every_object_and_the_background(samples_by_key):
    samples = list(samples_by_key.values())
    for sample in samples:
        caption, scene = sample["caption"], sample["scene"]
        assert scene["background"] in caption
        for obj in scene["objects"]:
            assert obj["colour"] in caption and obj["shape"] in caption, caption
    openings = Counter(" ".join(s["caption"].split()[:2]) for s in samples)
    assert len(openings) > 20  # phrasing varies, not one template


def test_variants_differ_from_their_base_exactly_in_the_recorded_edit(samples_by_key):
    variants = [s for s in samples_by_key.values() if s["variant_of"]]
    assert len(variants) > 200
    for variant in variants:
        base = samples_by_key[variant["variant_of"]]
        assert base["family"] == variant["family"] and base["edit"] == []
        expected = {EDIT_TO_RELATION[edit] for edit in variant["edit"]}
        assert attribute_differences(base["scene"], variant["scene"]) == expected
    assert {e for v in variants for e in v["edit"]} == set(EDIT_TYPES)
    background_only = sum(v["edit"] == ["background"] for v in variants)
    assert background_only / len(variants) > 0.15
    straddling = [v for v in variants if v["key"][:5] != v["variant_of"][:5]]
    assert straddling, "some families should straddle two shards"


@pytest.mark.parametrize("fraction", [0.7, 0.4])
def test_share_of_images_in_families_is_as_configured(fraction):
    members = defaultdict(int)
    for shard in range(5):
        samples = shard_samples(5, shard, 100, family_fraction=fraction)
        assert sum(s["family"] is not None for s in samples) == round(fraction * 100)
        assert all(s["variant_of"] is None for s in samples if s["family"] is None)
        for s in samples:
            if s["family"] is not None and not s["family"].startswith("00004-tail"):
                members[s["family"]] += 1
    assert set(members.values()) <= set(range(3, 7))


def test_adding_a_shard_leaves_existing_shards_untouched(tmp_path):
    four = write_demo_corpus(tmp_path / "corpus", num_shards=4, images_per_shard=SMALL_SHARD)
    before = _digests(four)
    added = write_demo_shard(tmp_path / "corpus", 4, images_per_shard=SMALL_SHARD)
    assert added.name == "00004.tar"
    assert _digests(four) == before
    five = _digests(
        write_demo_corpus(tmp_path / "five", num_shards=5, images_per_shard=SMALL_SHARD)
    )
    assert five == {**before, "00004.tar": _digests([added])["00004.tar"]}


def test_attribute_differences_matches_objects_regardless_of_order():
    red_left, blue_star = _obj(), _obj("star", "blue", "small", "top", "striped")
    scene = {"background": "sand", "objects": [red_left, blue_star]}
    assert (
        attribute_differences(scene, {"background": "sand", "objects": [blue_star, red_left]})
        == set()
    )
    recoloured = {"background": "sand", "objects": [blue_star, _obj(colour="green")]}
    assert attribute_differences(scene, recoloured) == {"colour"}
    added = {
        "background": "night",
        "objects": [red_left, blue_star, _obj("cross", position="right")],
    }
    assert (
        attribute_differences(scene, added)
        == attribute_differences(added, scene)
        == {"background", "count"}
    )
    moved_and_resized = {
        "background": "sand",
        "objects": [red_left, {**blue_star, "position": "bottom", "size": "large"}],
    }
    assert attribute_differences(scene, moved_and_resized) == {"position", "size"}
    assert set(RELATION_TYPES) >= {EDIT_TO_RELATION[e] for e in EDIT_TYPES}


def test_objects_stay_off_the_border_and_colours_stay_apart_from_backgrounds():
    for background, (r, g, b) in BACKGROUNDS.items():
        crowded = {
            "background": background,
            "objects": [_obj("star", "red", "large", cell, "striped") for cell in POSITIONS],
        }
        pixels = np.asarray(render_scene(crowded, np.random.default_rng(0)), dtype=float)
        border = np.concatenate(
            [
                pixels[:2].reshape(-1, 3),
                pixels[-2:].reshape(-1, 3),
                pixels[:, :2].reshape(-1, 3),
                pixels[:, -2:].reshape(-1, 3),
            ]
        )
        assert np.abs(border - [r, g, b]).max() < 25, background
        assert np.abs(pixels - [r, g, b]).max() > 100  # the objects were drawn
    for colour, background in (
        (c, b) for c in OBJECT_COLOURS.values() for b in BACKGROUNDS.values()
    ):
        assert np.linalg.norm(np.subtract(colour, background)) > 60


def test_benchmark_ground_truths_satisfy_the_edit_and_are_complete(benchmark):
    _, queries, scenes = benchmark
    assert len(queries) == 40 and len(scenes) == 250
    by_signature = defaultdict(set)
    for image_id, scene in scenes.items():
        by_signature[scene_signature(scene)].add(image_id)
    for query in queries:
        (edit,) = query["semantic_aspects"]
        reference = scenes[query["reference_img_id"]]
        target = scenes[query["target_img_id"]]
        assert query["gt_img_ids"][0] == query["target_img_id"]
        assert query["reference_img_id"] not in query["gt_img_ids"]
        assert len(query["gt_img_ids"]) >= 2
        assert set(query["gt_img_ids"]) == by_signature[scene_signature(target)]
        for gt in query["gt_img_ids"]:
            assert attribute_differences(reference, scenes[gt]) == {EDIT_TO_RELATION[edit]}
        count_change = len(target["objects"]) - len(reference["objects"])
        assert count_change == {"add_object": 1, "remove_object": -1}.get(edit, 0)
        if edit == "background":
            assert target["background"] in query["relative_caption"]
        assert query["relative_caption"] and query["shared_concept"]


def test_benchmark_gallery_layout_balance_and_disjointness(benchmark, samples_by_key):
    root, queries, scenes = benchmark
    files = sorted(p.name for p in (root / "images").iterdir())
    assert files == sorted(f"{image_id:012d}.jpg" for image_id in scenes)
    assert all(q["reference_img_id"] in scenes for q in queries)
    assert min(scenes) >= GALLERY_ID_OFFSET
    assert not set(scenes) & {int(key) for key in samples_by_key}
    per_edit = Counter(q["semantic_aspects"][0] for q in queries)
    assert set(per_edit) == set(EDIT_TYPES) and max(per_edit.values()) - min(per_edit.values()) <= 1
    assert [q["id"] for q in queries] == list(range(len(queries)))


def test_benchmark_is_deterministic_and_checks_gallery_size(benchmark, tmp_path):
    root, _, _ = benchmark
    again = write_demo_benchmark(tmp_path / "again", num_queries=40, gallery_size=250, seed=7)
    other = write_demo_benchmark(tmp_path / "other", num_queries=40, gallery_size=250, seed=8)
    for name in ("annotations/val.json", "metadata.jsonl"):
        assert (again / name).read_bytes() == (root / name).read_bytes()
        assert (other / name).read_bytes() != (root / name).read_bytes()
    some_image = next((root / "images").iterdir()).name
    assert (again / "images" / some_image).read_bytes() == (
        root / "images" / some_image
    ).read_bytes()
    with pytest.raises(ValueError, match="gallery"):
        write_demo_benchmark(tmp_path / "small", num_queries=40, gallery_size=100)


def test_distinct_scenes_have_distinct_signatures(samples_by_key):
    scenes = [s["scene"] for s in list(samples_by_key.values())[:60]]
    for a, b in combinations(scenes, 2):
        assert (scene_signature(a) == scene_signature(b)) == (attribute_differences(a, b) == set())
