"""What the artifact store holds after a run, as numbers a person can read."""

import math
from collections import Counter
from collections.abc import Mapping, Sequence

from megapairs_dagster.artifacts import artifact_relpath, load_artifact
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
            f"triplets: {summary['triplets']['triplets']} rows over "
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


# The metrics each benchmark family reports, headline first: CIRCO-format, CIRR, FashionIQ.
METRIC_FAMILIES = (
    ("mAP@5", "mAP@10", "mAP@25", "mAP@50"),
    ("R@1", "R@5", "R@10", "R@50", "R_subset@1"),
    ("R@10", "R@50", "avg"),
)


def reported_metrics(metrics) -> tuple[str, ...]:
    """The family of columns a benchmark's overall metrics belong to."""
    present = set(metrics)
    return next((f for f in METRIC_FAMILIES if f[0] in present and f[-1] in present), ())


def training_reports(store: ArtifactStoreClient, runs: Mapping[str, str]) -> dict[str, dict]:
    """The training report (steps, seconds, samples/s, final loss) of each run that has a
    record, ``runs`` naming each run's training asset (``mmret_clip`` or ``mmret_mllm``)."""
    reports = {}
    for run, trainer in runs.items():
        try:
            record = load_artifact(store, artifact_relpath([trainer], run))
        except FileNotFoundError:
            continue
        if "report" in record:  # a zero-step run (the base encoder) trained nothing
            reports[run] = record["report"]
    return reports


def compare_runs(
    scores, baseline: str, seeds: Sequence[str], control: str | None, metric: str = "mAP@5"
) -> dict:
    """How the seeds of one recipe stand against the baseline and the control, per query
    group: ``{group: {"baseline", "control", "seeds": [...], "beats_baseline",
    "beats_control"}}`` (counts of seeds strictly above)."""
    rows = scores[scores["metric"] == metric]
    value = rows.set_index(["model", "query_group"])["value"]
    comparison = {}
    for group in ["all", *sorted(set(rows["query_group"]) - {"all"})]:
        base = value.get((baseline, group))
        runs = [value.get((seed, group)) for seed in seeds]
        if base is None or any(run is None for run in runs):
            continue
        against = value.get((control, group)) if control else None
        comparison[group] = {
            "baseline": base,
            "control": against,
            "seeds": runs,
            "beats_baseline": sum(run > base for run in runs),
            "beats_control": None if against is None else sum(run > against for run in runs),
        }
    return comparison


def format_scores(
    scores,
    *,
    baseline: str = "base_encoder",
    seeds: Sequence[str] = (),
    control: str | None = None,
    training: dict[str, dict] | None = None,
) -> str:
    """Rows of the benchmark_scores table as one table per benchmark: a line per model with its
    training time and speed (from ``training``), the benchmark's overall metrics and its
    headline metric per query group; then, when ``seeds`` are given, their mean and how many
    of them beat the baseline and the control."""
    if scores.empty:
        return "no benchmark scores"
    training = training or {}
    lines = []
    for benchmark, rows in scores.groupby("benchmark", sort=True):
        groups = sorted(set(rows["query_group"]) - {"all"})
        columns = reported_metrics(rows.loc[rows["query_group"] == "all", "metric"])
        headline = columns[0] if columns else "mAP@5"
        cells = rows.set_index(["model", "query_group", "metric"])["value"].to_dict()
        lines.append(
            f"{benchmark:<16}{'train s':>8}{'samples/s':>10}" + "".join(f"{m:>11}" for m in columns)
            + (f"   {headline} by group:" + "".join(f"{g[:10]:>11}" for g in groups) if groups else "")
        )
        models = set(rows["model"])
        has_seeds = bool(seeds) and set(seeds) <= models
        table = {}
        for model in sorted(models, key=lambda m: (m != baseline, m == control, m not in seeds, m)):
            table[model] = {(g, m): v for (name, g, m), v in cells.items() if name == model}
            if has_seeds and model == seeds[-1]:
                table[f"mean of {len(seeds)} seeds"] = {
                    key: sum(table[seed].get(key, math.nan) for seed in seeds) / len(seeds)
                    for key in table[seeds[0]]
                }
        for label, values in table.items():
            lines.append(_score_row(label, values, training.get(label), columns, headline, groups))
        if has_seeds and baseline in models:
            comparison = compare_runs(rows, baseline, seeds, control, metric=headline)
            lines.append(_verdict(comparison, baseline, control, headline))
    return "\n".join(lines)


def _score_row(
    label: str, values: dict, training: dict | None, columns: Sequence[str],
    headline: str, groups: list[str],
) -> str:
    text = f"{label:<16}" + (
        f"{training['seconds']:>8.0f}{training['samples_per_s']:>10.0f}" if training else " " * 18
    )
    text += "".join(f"{values.get(('all', m), math.nan):>11.1f}" for m in columns)
    if groups:
        text += " " * (len(headline) + 13) + "".join(
            f"{values.get((g, headline), math.nan):>11.1f}" for g in groups
        )
    return text


def _verdict(comparison: dict, baseline: str, control: str | None, metric: str) -> str:
    """One line: how many seeds beat the baseline (and the control), overall and per group."""
    overall = comparison["all"]
    seeds = len(overall["seeds"])
    text = f"{metric}: {overall['beats_baseline']}/{seeds} seeds beat {baseline}"
    if overall["beats_control"] is not None:
        text += f", {overall['beats_control']}/{seeds} beat {control} (equal compute)"
    above = [g for g, c in comparison.items() if g != "all" and c["beats_baseline"] == seeds]
    below = [g for g, c in comparison.items() if g != "all" and c["beats_baseline"] == 0]
    return (
        text + f"; all seeds above {baseline} on: {', '.join(above) or 'none'}"
        f"; all below on: {', '.join(below) or 'none'}"
    )
