"""The leaderboard: every model's headline score per benchmark from the benchmark_scores
table, and its automation (rebuilt after any score, though other partitions are missing)."""

import base64
import io
import re

from dagster import (
    AssetKey,
    AssetMaterialization,
    DagsterInstance,
    evaluate_automation_conditions,
    materialize,
)
from PIL import Image

from megapairs_dagster.assets.leaderboard import build_leaderboard_asset
from megapairs_dagster.definitions import build_definitions
from megapairs_dagster.resources.profiles import load_deployment
from megapairs_dagster.resources.store import ArtifactStore
from megapairs_dagster.synthesis.triplet_store import TripletStore

SCORES = {  # (benchmark, model) -> metrics by query group, as benchmark_scores writes them
    ("circo", "base"): {"all": {"mAP@5": 34.26, "mAP@10": 35.0}, "colour": {"mAP@5": 50.0}},
    ("circo", "large"): {"all": {"mAP@5": 39.24, "mAP@10": 40.1}},
    ("cirr", "large"): {"all": {"R@1": 38.04, "R@5": 70.0, "R_subset@1": 70.96}},
    ("fashioniq", "base"): {"all": {"R@10": 31.55, "R@50": 52.0, "avg": 41.8},
                            "dress": {"R@10": 99.0, "R@50": 99.0}},
    ("genecis", "base"): {"all": {"R@1": 17.249, "R@2": 30.0},
                          "focus_object": {"R@1": 90.0}},
    ("mmeb", "large"): {"all": {}, "ImageNet-1K": {"hit@1": 60.0}},  # an incomplete MMEB
    ("circo", "retired"): {"all": {"mAP@5": 99.0}},  # a run the deployment no longer has
}
BENCHMARKS = ["circo", "cirr", "fashioniq", "genecis", "mmeb"]


def test_leaderboard_tabulates_each_models_headline_metric(tmp_path):
    store = ArtifactStore(url=str(tmp_path / "store"))
    table = TripletStore(store.client())
    for (benchmark, model), metrics in SCORES.items():
        table.replace_scores(benchmark, model, metrics, checkpoint="c")
    asset = build_leaderboard_asset(["base_encoder", "base", "large"], BENCHMARKS,
                                    ["benchmark_scores"])
    result = materialize([asset], resources={"store": store})
    (materialization,) = result.asset_materializations_for_node("leaderboard")
    metadata = materialization.metadata
    assert metadata["leaderboard"].value.splitlines() == [
        ("| model | CIRCO mAP@5 | CIRR R@1 | CIRR R_subset@1 | FashionIQ R@10 | GeneCIS R@1 "
         "| MMEB overall |"),
        "|---|---:|---:|---:|---:|---:|---:|",
        "| base_encoder | – | – | – | – | – | – |",
        "| base | 34.3 | – | – | **31.6** | **17.2** | – |",
        "| large | **39.2** | **38.0** | **71.0** | – | – | – |",
    ]
    assert metadata["scores"].value == 6  # table cells with a value
    (png,) = re.findall(r"base64,([A-Za-z0-9+/=]+)", metadata["plot"].value)
    assert Image.open(io.BytesIO(base64.b64decode(png))).format == "PNG"


def test_leaderboard_is_rebuilt_after_a_score_though_other_partitions_are_missing():
    """The paper deployment's scores are mostly missing (no data, runs not trained): one new
    score is enough, once; the next one requests it again."""
    defs = build_definitions(load_deployment("paper"))
    instance = DagsterInstance.ephemeral()
    cursor = None

    def tick() -> bool:
        nonlocal cursor
        result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        cursor = result.cursor
        return bool(result.get_requested_partitions(AssetKey("leaderboard")))

    def materialised(name: str, partition: str | None = None) -> None:
        instance.report_runless_asset_event(AssetMaterialization(name, partition=partition))

    assert not tick()  # no score yet: nothing to tabulate
    materialised("benchmark_scores", "circo|base")
    assert tick()
    materialised("leaderboard")
    assert not tick()
    materialised("benchmark_scores", "genecis|large")
    assert tick()
