"""Approximate vs exact top-20 inner-product search on clustered embeddings.

Builds the index that ``choose_index_spec`` picks for the collection and memory budget,
and the IVF-PQ with exact re-ranking it picks past IVF-Flat's budget (``--all``: also every
other index type), and prints, measured in one run: build time, index memory, search time
of the same queries exactly (IndexFlatIP) and through the index, the speed-up, and recall@20
against the exact result. A re-ranked index gets a second row: its own IVF-PQ searched
alone (same codes and nprobe, no re-ranking). Target: >= 10x faster at recall >= 0.95 on a
2-core machine.

    .venv/bin/python bench/knn.py --n 200000 --queries 2000 --json out.json
    .venv/bin/python bench/knn.py --n 1000000 --dim 64 --clusters 20000 --queries 1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import faiss
import numpy as np

from megapairs_dagster.synthesis.knn import (
    HNSW_NEIGHBORS,
    REFINED,
    TUNING_K,
    build_index,
    choose_index_spec,
    index_memory_bytes,
    ivf_list_count,
    label_recall,
    serialize_index,
)


def clustered_embeddings(
    num_vectors: int, dim: int, num_clusters: int, noise: float, seed: int
) -> np.ndarray:
    """L2-normalised float16 points in clusters of clusters, each cluster with its own
    spread (0.5x to 1.5x ``noise``), so neighbourhoods have graded distances like real
    embeddings; random vectors have no neighbourhoods, so recall on them means nothing."""
    rng = np.random.default_rng(seed)
    themes = rng.standard_normal((max(1, num_clusters // 50), dim)).astype(np.float32)
    centres = themes[rng.integers(0, len(themes), num_clusters)]
    centres += rng.standard_normal((num_clusters, dim), dtype=np.float32) * (0.8 / np.sqrt(dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spreads = rng.uniform(0.5 * noise, 1.5 * noise, num_clusters).astype(np.float32)
    out = np.empty((num_vectors, dim), dtype=np.float16)
    for start in range(0, num_vectors, 50_000):
        size = min(50_000, num_vectors - start)
        cluster = rng.integers(0, num_clusters, size)
        points = rng.standard_normal((size, dim), dtype=np.float32)
        points *= (spreads[cluster] / np.sqrt(dim))[:, None]
        points += centres[cluster]
        out[start : start + size] = points / np.linalg.norm(points, axis=1, keepdims=True)
    return out


def search_parameters(index: faiss.Index) -> str:
    """The tuned nprobe / efSearch / short-list factor, for the table."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        refine = f",k*{index.k_factor:g}" if isinstance(index, faiss.IndexRefine) else ""
        return f"nprobe={ivf.nprobe}{refine}"
    if isinstance(index, faiss.IndexHNSW):
        return f"efSearch={index.hnsw.efSearch}"
    return "-"


def timed_search(index: faiss.Index, queries: np.ndarray, exact: np.ndarray,
                 exact_seconds: float, repeats: int = 5) -> dict:
    """Median of `repeats` searches: they take well under a second, the exact one does not."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, labels = index.search(queries, TUNING_K)
        seconds.append(time.perf_counter() - start)
    search_seconds = statistics.median(seconds)
    return {
        "params": search_parameters(index),
        "search_s": search_seconds,
        "speedup": exact_seconds / search_seconds,
        "recall_at_20": label_recall(labels, exact),
    }


def measure(spec: str, vectors: np.ndarray, queries: np.ndarray, exact: np.ndarray,
            exact_seconds: float) -> list[dict]:
    """The index's row and, for a re-ranked index, its IVF-PQ alone."""
    start = time.perf_counter()
    index = build_index(vectors, spec)
    build_seconds = time.perf_counter() - start
    rows = [{
        "spec": spec,
        "build_s": build_seconds,
        "memory_estimate_mb": index_memory_bytes(spec, len(vectors), vectors.shape[1]) / 2**20,
        "serialized_mb": len(serialize_index(index)) / 2**20,
        **timed_search(index, queries, exact, exact_seconds),
    }]
    if isinstance(index, faiss.IndexRefine):
        base = faiss.downcast_index(index.base_index)
        base_spec = spec.removesuffix(REFINED)
        rows.append({
            "spec": f"{base_spec} (no re-rank)",
            "build_s": None,
            "memory_estimate_mb": index_memory_bytes(base_spec, len(vectors),
                                                     vectors.shape[1]) / 2**20,
            "serialized_mb": len(serialize_index(base)) / 2**20,
            **timed_search(base, queries, exact, exact_seconds),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000, help="collection size")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--clusters", type=int, default=4000)
    parser.add_argument("--noise", type=float, default=0.5,
                        help="mean noise norm around a unit centre (0.5: cosine ~0.8 within)")
    parser.add_argument("--budget-gb", type=float, default=2.0, help="index memory budget")
    parser.add_argument("--all", action="store_true", help="also build every other type")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()

    vectors = clustered_embeddings(args.n, args.dim, args.clusters, args.noise, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    queries = vectors[rng.choice(args.n, args.queries, replace=False)].astype(np.float32)

    flat = faiss.IndexFlatIP(args.dim)
    for start in range(0, args.n, 65_536):
        flat.add(vectors[start : start + 65_536].astype(np.float32))
    start = time.perf_counter()
    _, exact = flat.search(queries, TUNING_K)
    exact_seconds = time.perf_counter() - start
    del flat

    chosen = choose_index_spec(args.n, args.dim, int(args.budget_gb * 2**30))
    ivf_flat = f"IVF{ivf_list_count(args.n)},Flat"
    # what the chooser falls back to when the float32 vectors do not fit
    refined = choose_index_spec(args.n, args.dim, index_memory_bytes(ivf_flat, args.n, args.dim) - 1)
    candidates = [f"HNSW{HNSW_NEIGHBORS}", ivf_flat, refined] if args.all else [refined]
    specs = [chosen] + [spec for spec in candidates if spec != chosen]

    print(f"{args.n} x {args.dim} clustered vectors ({args.clusters} clusters), "
          f"{args.queries} queries, top-{TUNING_K}, faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads, budget {args.budget_gb} GiB -> {chosen}")
    print(f"exact search (IndexFlatIP): {exact_seconds:.2f} s")
    header = (f"{'index':<36}{'params':<18}{'build s':>9}{'mem MB':>9}{'file MB':>9}"
              f"{'search s':>10}{'speed-up':>10}{'recall@20':>11}")
    print(header)
    print("-" * len(header))
    results = []
    for spec in specs:
        for row in measure(spec, vectors, queries, exact, exact_seconds):
            results.append(row)
            build = "-" if row["build_s"] is None else f"{row['build_s']:.1f}"
            print(f"{row['spec']:<36}{row['params']:<18}{build:>9}"
                  f"{row['memory_estimate_mb']:>9.0f}{row['serialized_mb']:>9.0f}"
                  f"{row['search_s']:>10.3f}{row['speedup']:>9.1f}x{row['recall_at_20']:>11.3f}",
                  flush=True)

    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"config": vars(args), "chosen": chosen,
                       "exact_search_s": exact_seconds, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
