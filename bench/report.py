"""Every benchmark's ratios in one table: runs the bench scripts (``--run``) or reads the JSONs
they wrote to bench/results/, prints one table, writes bench/results/summary.json and
bench/results/summary.png.

Each script also runs alone and writes the JSON read here (``--json``). ``--run`` runs them
with the arguments in RUNS, chosen so that all of them take about 11 minutes on a quiet 2-core
machine; ``--only`` runs some of them. The table shows every JSON there, whichever run wrote
it (each row carries its file's date); a missing one is listed as such.

    .venv/bin/python bench/report.py            # tabulate the JSONs already there
    .venv/bin/python bench/report.py --run      # what `make bench` does
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# name: extra arguments of bench/<name>.py (each gets --json bench/results/<name>.json).
RUNS: dict[str, list[str]] = {
    "embed": ["--num-workers", "2", "--repeats", "2"],
    # 200k x 512 took 7.6 min under load (builds of 166 s and 243 s); knn.md's smaller set
    "knn": ["--n", "120000", "--dim", "128", "--clusters", "2400", "--queries", "300"],
    "train": ["--repeats", "3"],
    "train_mllm": ["--repeats", "2"],
    "train_launch": [],
    "generation": ["--concurrency", "1", "16", "--repeats", "2"],
    "dagster_overhead": ["--repeats", "2"],
    "scaling": [],
    "artifact_reads": [],
}


def _embed(data: dict) -> list[dict]:
    """pipeline / raw forward per view, at the setting where it was best."""
    best: dict[str, dict] = {}
    for row in data["rows"]:
        if "ratio" in row and row["ratio"] > best.get(row["view"], {"ratio": -1})["ratio"]:
            best[row["view"]] = row
    return [_row(f"{view} pipeline / raw forward", row["ratio"], "x", ">= 0.85",
                 f"threads {row['threads']}, workers {row['num_workers']}")
            for view, row in best.items()]


def _knn(data: dict) -> list[dict]:
    rows = []
    for result in data["results"]:
        note = f"recall@20 {result['recall_at_20']:.3f}, {result['params']}"
        rows.append(_row(f"{result['spec']} speed-up vs exact", result["speedup"], "x",
                         ">= 10 at recall >= 0.95", note))
    return rows


def _trainer(plain: str) -> Callable[[dict], list[dict]]:
    def rows(data: dict) -> list[dict]:
        return [_row(f"{name} / {plain}", ratio, "x", ">= 0.9",
                     f"batch {data['batch_size']}, {data['device']}")
                for name, ratio in data["ratio"].items()]
    return rows


def _train_launch(data: dict) -> list[dict]:
    memory, launch = data["memory"], data["launch"]
    return [
        _row("peak PSS growth 1x -> 4x data, streaming", memory["streaming_growth_mb"], "MiB",
             "flat", f"in-memory reading: {memory['in_memory_growth_mb']:+.0f} MiB"),
        _row("Pipes 2-process launch / in-process", launch["ratio"], "x", "-",
             "same global batch"),
    ]


def _generation(data: dict) -> list[dict]:
    return [_row(f"pipeline / bare server calls, concurrency {row['concurrency']}",
                 row["ratio"], "x", ">= 0.9", f"{row['pipeline_pairs_per_s']:.1f} pairs/s")
            for row in data["rows"]]


def _dagster_overhead(data: dict) -> list[dict]:
    return [_row(f"{row['label']}: wall / step time", row["wall_over_steps"], "x", "-",
                 f"overhead {row['overhead_s']:.2f} s per partition run")
            for row in data["rows"]]


def _scaling(data: dict) -> list[dict]:
    rows = [_row(f"{row['stage']}: cost exponent 1x -> 4x", row["exponent"], "exp",
                 "1 (linear)", f"{row['1x_s']:.1f} / {row['2x_s']:.1f} / {row['4x_s']:.1f} s"
                 + ("" if row["linear"] else "; not linear"))
            for row in data["stages"] if row["exponent"] is not None]
    new = data["new_shard"]
    rows.append(_row("full recompute of 4 shards / one new shard", new["full_over_new"], "x",
                     "> 1", f"{new['new_shard_s']:.1f} s vs {new['full_recompute_4_shards_s']:.1f} s"))
    return rows


def _artifact_reads(data: dict) -> list[dict]:
    return [_row(f"{row['case']}: pyarrow default / pipeline time", row["ratio"], "x", ">= 0.9",
                 f"{row['pipeline_ms']:.1f} vs {row['pyarrow_default_ms']:.1f} ms")
            for row in data["rows"]]


READERS: dict[str, Callable[[dict], list[dict]]] = {
    "embed": _embed,
    "knn": _knn,
    "train": _trainer("plain_open_clip"),
    "train_mllm": _trainer("plain_peft"),
    "train_launch": _train_launch,
    "generation": _generation,
    "dagster_overhead": _dagster_overhead,
    "scaling": _scaling,
    "artifact_reads": _artifact_reads,
}


def _row(measure: str, value: float | None, unit: str, target: str, note: str) -> dict:
    return {"measure": measure, "value": value, "unit": unit, "target": target, "note": note}


def summarize(results: Path, names: list[str]) -> tuple[list[dict], list[str]]:
    """(one row per ratio, tagged with its bench and JSON date; the names without a JSON)."""
    rows, missing = [], []
    for name in names:
        path = results / f"{name}.json"
        if not path.exists():
            missing.append(name)
            continue
        measured = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
        for row in READERS[name](json.loads(path.read_text())):
            rows.append({"bench": name, **row, "measured": measured.strftime("%Y-%m-%d %H:%M")})
    return rows, missing


def format_table(rows: list[dict]) -> str:
    lines = [f"{'bench':<17}{'measure':<62}{'value':>9} {'unit':<4} {'target':<24}note"]
    for row in rows:
        value = "-" if row["value"] is None else f"{row['value']:.2f}"
        lines.append(f"{row['bench']:<17}{row['measure'][:61]:<62}{value:>9} {row['unit']:<4} "
                     f"{row['target']:<24}{row['note']}")
    return "\n".join(lines)


def plot(rows: list[dict], scaling: dict | None, path: Path) -> None:
    """Ratios as bars (log scale, 1 marked), and per-stage cost at 1x/2x/4x when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [row for row in rows if row["unit"] == "x" and row["value"]]
    panels = 2 if scaling else 1
    figure, axes = plt.subplots(1, panels, figsize=(9 * panels, max(4.0, 0.3 * len(ratios) + 2)),
                                squeeze=False)
    ax = axes[0][0]
    ax.barh([f"{r['bench']}: {r['measure'][:50]}" for r in ratios],
            [r["value"] for r in ratios])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("ratio (log scale)")
    ax.tick_params(axis="y", labelsize=7)
    if scaling:
        ax = axes[0][1]
        scales = [1, 2, 4]
        for stage in scaling["stages"]:
            costs = [stage[f"{s}x_s"] for s in scales]
            if min(costs) > 0:
                ax.plot(scales, costs, marker="o", label=stage["stage"][:40])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("corpus size (demo shards)")
        ax.set_ylabel("step seconds")
        ax.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="run the bench scripts first")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS),
                        help="with --run: run only these")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.only if args.run else ():
        started = time.perf_counter()
        command = [sys.executable, str(Path(__file__).with_name(f"{name}.py")), *RUNS[name],
                   "--json", str(args.results / f"{name}.json")]
        print(f"== {' '.join(command[1:])}", flush=True)
        if subprocess.run(command, check=False).returncode:
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - started:.0f} s", flush=True)

    rows, missing = summarize(args.results, list(RUNS))
    print("\n" + format_table(rows))
    if missing:
        print(f"\nno JSON (not run yet) for: {', '.join(missing)}")
    scaling_path = args.results / "scaling.json"
    scaling = json.loads(scaling_path.read_text()) if scaling_path.exists() else None
    plot(rows, scaling, args.results / "summary.png")
    (args.results / "summary.json").write_text(json.dumps(
        {"rows": rows, "missing": missing, "failed": failed}, indent=2))
    print(f"wrote {args.results / 'summary.json'} and {args.results / 'summary.png'}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
