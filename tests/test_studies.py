"""The studies (Fig. 2's scaling curve, Tables 5 and 4's ablations): their runs in the shipped
deployment when MEGAPAIRS_STUDIES asks for them, nested triplet subsets, and the study assets'
tables from the benchmark_scores table."""

import json

import numpy as np
import pandas as pd
import pytest
from dagster import AssetKey, materialize

from megapairs_dagster.artifacts import JSON_SUFFIX, artifact_relpath
from megapairs_dagster.definitions import build_definitions
from megapairs_dagster.resources.profiles import STUDIES_ENV, TrainingRun, load_deployment
from megapairs_dagster.retrieval import nested_subset
from megapairs_dagster.synthesis.triplet_store import TripletStore


def test_studies_are_off_unless_asked_for(monkeypatch):
    monkeypatch.delenv(STUDIES_ENV, raising=False)
    deployment = load_deployment("demo", "home")
    assert deployment.studies == {}
    keys = build_definitions(deployment).resolve_asset_graph().get_all_asset_keys()
    assert AssetKey("scaling_curve") not in keys


def test_each_study_varies_one_setting_of_the_primary_run_per_seed(monkeypatch):
    monkeypatch.setenv(STUDIES_ENV, "2")
    deployment = load_deployment("demo", "home")
    runs, studies = deployment.training_runs, deployment.studies
    assert set(studies) == {"scaling_curve", "view_ablation", "hard_negative_ablation"}
    primary = runs["demo"]
    scaling = studies["scaling_curve"].points
    assert list(scaling) == ["0", "1/16", "1/8", "1/4", "1/2", "1"]
    assert scaling["0"] == ("base_encoder",) and scaling["1"] == ("demo", "demo_seed1")
    assert scaling["1/8"] == ("frac_1_8", "frac_1_8_seed1")
    assert runs["frac_1_8_seed1"] == TrainingRun(seed_offset=primary.seed_offset + 1,
                                                 triplets_fraction=1 / 8)
    views = studies["view_ablation"].points
    assert runs[views["D+T"][0]].views == ("dino_image", "clip_caption")
    assert views["D+I+T"] == ("demo", "demo_seed1")
    negatives = studies["hard_negative_ablation"].points
    assert [runs[names[0]].hard_negatives for names in negatives.values()] == [
        "none", "query", None]  # the last is the primary run: the training resource's default
    # every study run is a partition of training and scoring
    graph = build_definitions(deployment).resolve_asset_graph()
    trained = set(graph.get(AssetKey("mmret_clip")).partitions_def.get_partition_keys())
    assert {run for study in studies.values() for run in study.runs} <= trained
    monkeypatch.setenv(STUDIES_ENV, "-1")
    with pytest.raises(ValueError, match="number of seeds"):
        load_deployment("demo", "home")


def test_nested_subsets_grow_by_adding_pairs_only():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"query_id": rng.integers(0, 10**12, 4000),
                          "target_id": rng.integers(0, 10**12, 4000)})
    sizes, previous = [], set()
    for fraction in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0):
        subset = nested_subset(frame, fraction)
        pairs = set(zip(subset["query_id"], subset["target_id"]))
        assert previous <= pairs
        sizes.append(len(pairs))
        previous = pairs
    assert sizes[-1] == 4000
    for size, fraction in zip(sizes, (1 / 16, 1 / 8, 1 / 4, 1 / 2)):
        assert abs(size - fraction * 4000) < 4 * (fraction * 4000) ** 0.5  # a fair hash
    # a pair's membership does not depend on the other rows
    shuffled = frame.sample(frac=1, random_state=1).head(1000)
    kept = set(zip(*nested_subset(shuffled, 0.25)[["query_id", "target_id"]].T.values))
    assert kept == set(zip(shuffled["query_id"], shuffled["target_id"])) & {
        pair for pair in zip(*nested_subset(frame, 0.25)[["query_id", "target_id"]].T.values)}
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        nested_subset(frame, 0.0)


def test_study_assets_tabulate_points_and_seeds_from_the_scores(tmp_path, monkeypatch):
    monkeypatch.setenv(STUDIES_ENV, "2")
    deployment = load_deployment("demo", str(tmp_path / "home"))
    defs = build_definitions(deployment)
    store = deployment.resources["store"]
    client = store.client()
    table = TripletStore(client)
    scores = {"base_encoder": 20.0, "frac_1_16": 21.0, "frac_1_16_seed1": 22.0,
              "demo": 30.0, "demo_seed1": 31.0, "views_D": 25.0}
    for model, value in scores.items():
        table.replace_scores("demo_cir", model, {"all": {"mAP@5": value}}, checkpoint="c")
    trained = {"base_encoder": None, "frac_1_16": 100, "frac_1_8": 210, "frac_1_4": 400,
               "frac_1_2": 850, "demo": 1705}
    for run, count in trained.items():
        record = {"checkpoint": None} if count is None else {"data": {"triplets": count}}
        client.write_bytes(artifact_relpath(["mmret_clip"], run) + JSON_SUFFIX,
                           json.dumps(record).encode())
    names = ["scaling_curve", "view_ablation", "hard_negative_ablation"]
    assets = [a for a in defs.assets if {AssetKey(n) for n in names} & set(a.keys)]
    result = materialize(assets, resources={"store": store})
    metadata = {name: result.asset_materializations_for_node(name)[0].metadata for name in names}

    scaling = metadata["scaling_curve"]["results"].value.splitlines()
    assert scaling[0] == ("| triplets | demo mAP@5 seed 0 | demo mAP@5 seed 1 "
                          "| demo mAP@5 mean |")
    assert scaling[2] == "| 0 | 20.0 | – | 20.0 |"
    assert scaling[3] == "| 1/16 | 21.0 | 22.0 | 21.5 |"
    assert scaling[4] == "| 1/8 | – | – | – |"
    assert scaling[-1] == "| 1 | 30.0 | 31.0 | **30.5** |"
    assert metadata["scaling_curve"]["triplets"].value == {
        "0": 0, "1/16": 100, "1/8": 210, "1/4": 400, "1/2": 850, "1": 1705}
    assert "plot" in metadata["scaling_curve"]
    views = metadata["view_ablation"]["results"].value.splitlines()
    assert views[2] == "| D | 25.0 | – | 25.0 |" and views[-1].startswith("| D+I+T | 30.0 |")
    assert metadata["hard_negative_ablation"]["scored_runs"].value == 2  # demo's two seeds
