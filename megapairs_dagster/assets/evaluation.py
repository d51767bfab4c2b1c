"""``demo_benchmark`` and ``benchmark_scores`` (benchmark × model)."""

import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from dagster import (
    AssetDep,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    MultiPartitionsDefinition,
    StaticPartitionsDefinition,
    asset,
)
from PIL import Image

from megapairs_dagster.assets.policies import GPU_POOL, GPU_TAGS
from megapairs_dagster.assets.training import TRAINING_RUNS, open_start_model
from megapairs_dagster.assets.triplets import triplet_store
from megapairs_dagster.benchmarks.datasets import load_cirr, load_fashioniq
from megapairs_dagster.benchmarks.evaluate import (
    ComposedEncoder,
    Metrics,
    evaluate_circo_format,
    evaluate_cirr,
    evaluate_fashioniq,
)
from megapairs_dagster.benchmarks.readers import read_circo
from megapairs_dagster.demo import write_demo_benchmark
from megapairs_dagster.resources.settings import BenchmarkData, Compute, TripletDatabase
from megapairs_dagster.resources.store import ArtifactStore, artifact_relpath, load_artifact
from megapairs_dagster.retrieval import MMRetCLIP

BENCHMARKS = ["demo_cir", "circo", "cirr", "fashioniq"]
# The metric each benchmark's papers lead with: the one shown per query group in the metadata.
HEADLINE_METRIC = {"demo_cir": "mAP@5", "circo": "mAP@5", "cirr": "R@1", "fashioniq": "R@10"}
# `base_encoder` scores the untrained base (zero-shot, same fusion); the rest are MMRet runs.
SCORED_MODELS = ["base_encoder", *TRAINING_RUNS]
benchmark_by_model = MultiPartitionsDefinition(
    {"benchmark": StaticPartitionsDefinition(BENCHMARKS),
     "model": StaticPartitionsDefinition(SCORED_MODELS)}
)


@asset(
    group_name="evaluation",
    code_version="1",
    description="The demo CIR benchmark in the CIRCO annotation format: held-out images and "
    "one-edit queries whose ground truths follow from the generator's attributes. Fixed before "
    "any training and independent of every model.",
)
def demo_benchmark(store: ArtifactStore) -> MaterializeResult:
    client = store.client()
    with tempfile.TemporaryDirectory() as tmp:
        write_demo_benchmark(tmp)
        queries = json.loads((Path(tmp) / "annotations" / "val.json").read_text())
        images = len(list((Path(tmp) / "images").glob("*.jpg")))
        client.upload_dir(tmp, "demo_benchmark")
    edits = sorted({query["semantic_aspects"][0] for query in queries})
    return MaterializeResult(
        metadata={"queries": len(queries), "gallery": images, "edit_types": ", ".join(edits),
                  "path": MetadataValue.path(client.url("demo_benchmark"))}
    )


# A benchmark, read and checked, waiting for the model to score.
Scorer = Callable[[ComposedEncoder], Metrics]


def _demo_cir(store: ArtifactStore) -> Scorer:
    client = store.client()
    raw = json.loads(client.read_bytes("demo_benchmark/annotations/val.json"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "val.json"
        path.write_text(json.dumps(raw))
        queries = read_circo(path)
    folder = client.path("demo_benchmark", "images")
    gallery = sorted(str(int(p.name.split(".")[0])) for p in folder.iterdir() if p.name.endswith(".jpg"))
    groups = {str(record["id"]): record["semantic_aspects"][0] for record in raw}

    def load(image_id: str) -> Image.Image:
        data = client.read_bytes(f"demo_benchmark/images/{int(image_id):012d}.jpg")
        return Image.open(io.BytesIO(data)).convert("RGB")

    return lambda model: evaluate_circo_format(model, queries, gallery, load, groups=groups)


def _circo(data: BenchmarkData) -> Scorer:
    folder = Path(data.circo_images)
    queries = read_circo(data.circo_annotations)
    gallery = sorted(str(int(p.stem)) for p in folder.glob("*.jpg"))

    def load(image_id: str) -> Image.Image:
        return Image.open(folder / f"{int(image_id):012d}.jpg").convert("RGB")

    return lambda model: evaluate_circo_format(model, queries, gallery, load)


def _cirr(data: BenchmarkData) -> Scorer:
    queries, gallery, load = load_cirr(data.cirr_annotations, data.cirr_images)
    return lambda model: evaluate_cirr(model, queries, gallery, load)


def _fashioniq(data: BenchmarkData) -> Scorer:
    queries, galleries, load = load_fashioniq(data.fashioniq_annotations, data.fashioniq_images)
    return lambda model: evaluate_fashioniq(model, queries, galleries, load)


REAL_BENCHMARKS = {"circo": _circo, "cirr": _cirr, "fashioniq": _fashioniq}


@asset(
    partitions_def=benchmark_by_model,
    group_name="evaluation",
    deps=[AssetDep("demo_benchmark"), AssetDep("mmret_clip"), AssetDep("base_encoders")],
    code_version="1",
    pool=GPU_POOL,
    op_tags=GPU_TAGS,
    description="Metrics of one model on one benchmark, as the official evaluation computes "
    "them; also rows of the DuckDB table `benchmark_scores`. Unconfigured benchmarks are "
    "skipped with a message naming the settings to set.",
)
def benchmark_scores(
    context: AssetExecutionContext,
    store: ArtifactStore,
    compute: Compute,
    benchmark_data: BenchmarkData,
    triplet_db: TripletDatabase,
) -> MaterializeResult:
    keys = context.partition_key.keys_by_dimension
    benchmark, model_name = keys["benchmark"], keys["model"]
    unset = benchmark_data.unset(benchmark)
    if unset:
        message = f"skipped: set {' and '.join(unset)} to score {benchmark}"
        context.log.warning(message)
        return MaterializeResult(metadata={"skipped": message})
    # Read and check the benchmark before loading a model: a missing image fails fast.
    read = REAL_BENCHMARKS.get(benchmark)
    score = read(benchmark_data) if read else _demo_cir(store)
    client = store.client()
    base_encoders = load_artifact(client, artifact_relpath(["base_encoders"], None))
    if model_name == "base_encoder":
        model = open_start_model("demo", base_encoders, store, compute.cache_dir)
        checkpoint = base_encoders["clip"]["pretrained"]
    else:
        record = load_artifact(client, artifact_relpath(["mmret_clip"], model_name))
        checkpoint = record["checkpoint"]
        model = MMRetCLIP.from_pretrained(client.local_dir(checkpoint, compute.cache_dir))
    metrics = score(model)
    rows = triplet_store(triplet_db).replace_scores(benchmark, model_name, metrics, checkpoint)
    overall, headline = metrics["all"], HEADLINE_METRIC[benchmark]
    return MaterializeResult(
        metadata={
            **{name: float(value) for name, value in overall.items()},
            "by_group": MetadataValue.json(
                {group: round(values[headline], 2) for group, values in metrics.items()}
            ),
            "checkpoint": checkpoint,
            "duckdb_rows": rows,
        }
    )
