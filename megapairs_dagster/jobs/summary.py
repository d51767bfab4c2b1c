"""What the artifact store holds after a run, as numbers a person can read."""


from collections import Counter
from collections.abc import Sequence

from megapairs_dagster.resources.store import artifact_relpath, load_artifact
from megapairs_dagster.storage import ArtifactStoreClient
from megapairs_dagster.synthesis.views import VIEWS


def pipeline_summary(store: ArtifactStoreClient, shard_keys: Sequence[str]) -> dict:
    summary: dict = {"shards": len(shard_keys), "images": 0, "rejects": Counter()}
    for key in shard_keys:
        summary["images"] += len(load_artifact(store, artifact_relpath(["corpus_images"], key)))
        rejects = load_artifact(store, artifact_relpath(["corpus_rejects"], key))
        summary["rejects"].update(rejects["reason"])
    encoders = load_artifact(store, artifact_relpath(["base_encoders"], None))
    curve = encoders.get("bootstrap", {}).get("curve", [])
    if curve:
        summary["bootstrap"] = {"seconds": curve[-1]["seconds"], **{
            name: max(point[name] for point in curve)
            for name in ("image_to_text_r1", "text_to_image_r1")
        }}
    summary["indexes"] = {}
    for view in VIEWS:
        index = load_artifact(store, artifact_relpath([f"knn_index_{view}"], None))
        summary["indexes"][view] = {
            "spec": index.produced_by.get("spec"),
            "vectors": len(index.ids),
            "recall": index.produced_by.get("recall"),
        }
    summary["views"] = load_artifact(store, artifact_relpath(["view_report"], None))
    pairs = [load_artifact(store, artifact_relpath(["image_pairs"], key)) for key in shard_keys]
    summary["pairs"] = sum(len(frame) for frame in pairs)
    summary["pairs_per_view"] = Counter(v for frame in pairs for views in frame["views"] for v in views)
    for stage in ("description_rejects", "instruction_rejects"):
        frames = [load_artifact(store, artifact_relpath([stage], key)) for key in shard_keys]
        summary[stage] = Counter(r for frame in frames for r in frame["reason"])
    summary["instructions"] = sum(
        len(load_artifact(store, artifact_relpath(["instructions"], key))) for key in shard_keys
    )
    return summary


def format_summary(summary: dict) -> str:
    rejects = summary["rejects"]
    lines = [
        f"shards: {summary['shards']}   images: {summary['images']}   "
        + f"rejects: {sum(rejects.values())} {dict(rejects) or ''}"
    ]
    if "bootstrap" in summary:
        boot = summary["bootstrap"]
        lines.append(
            f"demo CLIP bootstrap: {boot['seconds']:.0f}s, held-out caption retrieval "
            f"R@1 image→text {boot['image_to_text_r1']:.1%}, text→image {boot['text_to_image_r1']:.1%}"
        )
    for view, index in summary["indexes"].items():
        recall = index["recall"]
        lines.append(
            f"knn_index_{view}: {index['spec']} over {index['vectors']} vectors"
            + (f", recall@20 {recall:.3f}" if recall is not None else "")
        )
    lines.append(
        f"image_pairs: {summary['pairs']} ({summary['pairs'] / max(summary['images'], 1):.2f} per "
        f"image; found by {dict(summary['pairs_per_view'])})"
    )
    for stage in ("description_rejects", "instruction_rejects"):
        lines.append(f"{stage}: {sum(summary[stage].values())} {dict(summary[stage]) or ''}")
    lines.append(f"instructions: {summary['instructions']} pairs with ≥ 3 instructions")
    if "triplets" in summary:
        lines.append(
            f"DuckDB triplets: {summary['triplets']['triplets']} rows over "
            f"{summary['triplets']['shards']} shards; export: {summary['export']}"
        )
    views = summary["views"]
    relation_names = next(
        (list(v["relation_differs"]) for v in views.values() if "relation_differs" in v), []
    )
    header = f"{'view':<13}{'window':>15}{'in-window':>10}{'caption overlap (random)':>26}"
    lines += ["", header + "".join(f"{name[:9]:>10}" for name in relation_names)]
    for view, report in views.items():
        low, high = report["window"]
        row = (
            f"{view:<13}{f'{low:.4g}–{high:.4g}':>15}{report['in_window']:>10}"
            f"{report['caption_overlap_in_window']:>15.2f} ({report['caption_overlap_random']:.2f})"
            + " " * 4
        )
        row += "".join(
            f"{report['relation_differs'][name]:>10.0%}" for name in relation_names
        ) if relation_names else ""
        lines.append(row)
    if relation_names:
        lines.append("(attribute columns: share of in-window neighbours differing in it)")
    return "\n".join(lines)


def format_scores(scores) -> str:
    """Benchmark rows from DuckDB as a table: one line per (benchmark, model), then per group."""
    if scores.empty:
        return "no benchmark scores"
    lines = []
    metrics = ["mAP@5", "mAP@10", "mAP@25", "mAP@50"]
    for (benchmark, model), rows in scores.groupby(["benchmark", "model"], sort=True):
        overall = rows[rows["query_group"] == "all"].set_index("metric")["value"]
        lines.append(
            f"{benchmark} {model:<13}" + "".join(f"{m} {overall.get(m, float('nan')):5.1f}  " for m in metrics)
        )
        groups = rows[(rows["query_group"] != "all") & (rows["metric"] == "mAP@5")]
        if len(groups):
            lines.append(
                "    mAP@5 by edit: "
                + ", ".join(f"{g} {v:.1f}" for g, v in zip(groups["query_group"], groups["value"]))
            )
    return "\n".join(lines)
