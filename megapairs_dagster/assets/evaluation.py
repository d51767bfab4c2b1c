"""``demo_benchmark`` and ``benchmark_scores`` (benchmark × model)."""

import io
import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from dagster import (
    AssetDep,
    AssetExecutionContext,
    AssetIn,
    AssetsDefinition,
    MaterializeResult,
    MetadataValue,
    MultiPartitionsDefinition,
    MultiToSingleDimensionPartitionMapping,
    StaticPartitionsDefinition,
    asset,
)
from PIL import Image

from megapairs_dagster.assets.policies import GPU_POOL, GPU_TAGS
from megapairs_dagster.assets.training import trained_model, training_partitions
from megapairs_dagster.assets.triplets import triplet_store
from megapairs_dagster.demo import write_demo_benchmark
from megapairs_dagster.evaluation.datasets import load_cirr, load_fashioniq
from megapairs_dagster.evaluation.evaluate import (
    ComposedEncoder,
    Metrics,
    evaluate_circo_format,
    evaluate_cirr,
    evaluate_fashioniq,
)
from megapairs_dagster.evaluation.readers import read_circo
from megapairs_dagster.resources.profiles import TrainingRun
from megapairs_dagster.resources.settings import BenchmarkData
from megapairs_dagster.resources.store import ArtifactStore

# The metric each benchmark's papers lead with: the one shown per query group in the metadata.
HEADLINE_METRIC = {"demo_cir": "mAP@5", "circo": "mAP@5", "cirr": "R@1", "fashioniq": "R@10"}




def benchmark_by_model(
    runs: Mapping[str, TrainingRun], benchmarks: Sequence[str]
) -> MultiPartitionsDefinition:
    """Benchmark × model, the model dimension being exactly ``mmret_clip``'s training runs, so
    each score maps to the one checkpoint it scores."""
    return MultiPartitionsDefinition(
        {"benchmark": StaticPartitionsDefinition(list(benchmarks)),
         "model": training_partitions(runs)}
    )


@asset(
    group_name="demo",
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


def build_scores_asset(
    runs: Mapping[str, TrainingRun], benchmarks: Sequence[str]
) -> AssetsDefinition:
    """``benchmark_scores`` over the deployment's training runs and benchmarks; only a
    deployment that scores the demo benchmark depends on it."""

    @asset(
        partitions_def=benchmark_by_model(runs, benchmarks),
        group_name="evaluation",
        ins={"mmret_clip": AssetIn(
            partition_mapping=MultiToSingleDimensionPartitionMapping(partition_dimension_name="model")
        )},
        deps=[AssetDep("demo_benchmark")] if "demo_cir" in benchmarks else [],
        output_required=False,
        code_version="1",
        pool=GPU_POOL,
        op_tags=GPU_TAGS,
        description="Metrics of one training run's model on one benchmark, as the official "
        "evaluation computes them; also rows of the `benchmark_scores` table. A benchmark "
        "whose data is not configured is skipped (nothing materialised) with a message naming "
        "the settings to set.",
    )
    def benchmark_scores(
        context: AssetExecutionContext,
        mmret_clip: dict,
        store: ArtifactStore,
        benchmark_data: BenchmarkData,
    ):
        keys = context.partition_key.keys_by_dimension
        benchmark, model_name = keys["benchmark"], keys["model"]
        unset = benchmark_data.unset(benchmark)
        if unset:
            context.log.warning(f"{benchmark} not scored: set {' and '.join(unset)}")
            return
        # Read and check the benchmark before loading a model: a missing image fails fast.
        read = REAL_BENCHMARKS.get(benchmark)
        score = read(benchmark_data) if read else _demo_cir(store)
        model = trained_model(mmret_clip, store)
        checkpoint = mmret_clip.get("checkpoint") or json.dumps(mmret_clip["start"])
        metrics = score(model)
        rows = triplet_store(store).replace_scores(benchmark, model_name, metrics, checkpoint)
        overall, headline = metrics["all"], HEADLINE_METRIC[benchmark]
        yield MaterializeResult(
            metadata={
                **{name: float(value) for name, value in overall.items()},
                "by_group": MetadataValue.json(
                    {group: round(values[headline], 2) for group, values in metrics.items()}
                ),
                "checkpoint": checkpoint,
                "table_rows": rows,
            }
        )

    return benchmark_scores
