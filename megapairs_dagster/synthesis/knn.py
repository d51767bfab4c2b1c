"""Faiss indexes over L2-normalised embeddings and top-K neighbour search.

Similarity is the inner product (cosine, since the vectors are normalised). Embeddings
arrive as float16 and are converted to float32 one batch at a time, so a 10^7-vector
collection never needs a float32 copy of everything. Index types are faiss
``index_factory`` strings: ``Flat``, ``HNSW{M}``, ``IVF{nlist},Flat``, ``IVF{nlist},PQ{m}``
and ``IVF{nlist},PQ{m},Refine(SQfp16)`` (IVF-PQ's short list re-ranked exactly).

With CUDA and faiss-gpu (the ``gpu`` extra), Flat, IVF-Flat and IVF-PQ indexes are trained,
filled and searched on every GPU faiss sees; HNSW and Refine have no GPU implementation in
faiss and stay on the CPU. Built indexes are returned (and serialised) as CPU indexes.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

try:
    import faiss
except ImportError as error:  # faiss is in an extra, so that CPU and GPU builds never mix
    raise ImportError(
        "megapairs-dagster needs faiss: install it with the `cpu` extra (faiss-cpu, "
        "pip install 'megapairs-dagster[cpu]') or, with CUDA, the `gpu` extra "
        "(faiss-gpu-cu12, pip install 'megapairs-dagster[gpu]'), not both"
    ) from error

# Below this size exact search is cheap enough and IVF has too few points to train on:
# a self-join of 50k x 512 vectors is ~1.3e12 multiply-adds (under a minute on 2 cores),
# and 4*sqrt(50k) ~ 1024 lists would need 39 * 1024 ~ 40k training points.
FLAT_MAX_VECTORS = 50_000
# Above this size HNSW's sequential graph construction takes too long (tens of minutes on
# a few cores) and it cannot be trained on a sample and filled shard by shard like IVF.
HNSW_MAX_VECTORS = 100_000
HNSW_NEIGHBORS = 32
# faiss's k-means warns when a centroid gets fewer training points than this.
MIN_TRAIN_POINTS_PER_CENTROID = 39
# Largest PQ code (bytes per vector) the chooser picks; 64 bytes for 512-dim vectors
# keeps a 10^8 collection under 8 GB of codes.
MAX_PQ_SUBQUANTIZERS = 64
PQ_CENTROIDS_PER_SUBQUANTIZER = 256  # 8-bit codes
# With exact re-ranking the PQ codes only have to get the true neighbours into the short
# list of k_factor * k candidates: one byte per REFINE_DIMS_PER_CODE dimensions (at most
# MAX_PQ_SUBQUANTIZERS), k_factor tuned from REFINE_K_FACTOR up. On 1M x 64 clustered vectors
# PQ32 with a 2k short list gave recall@20 0.975 at >100x exact speed (its codes alone: 0.80);
# PQ16 stayed at 0.91 even with an 8k one (docs/benchmarks/knn.md).
REFINE_DIMS_PER_CODE = 2
REFINE_K_FACTOR = 2
MAX_REFINE_K_FACTOR = 64
REFINED = ",Refine(SQfp16)"

# Default search parameters are tuned after building until recall@TUNING_K reaches
# TARGET_RECALL + TUNING_MARGIN on a sample; the margin absorbs sampling error.
TARGET_RECALL = 0.95
TUNING_MARGIN = 0.01
TUNING_K = 20
TUNING_SAMPLE_SIZE = 500
# A doubling step that gains less recall than this means the index has plateaued
# (IVF-PQ is limited by quantisation error, not by nprobe).
TUNING_MIN_GAIN = 0.005
MAX_EF_SEARCH = 1024

# Extra neighbours fetched per query to make up for the query itself and duplicates.
SELF_AND_DUPLICATE_MARGIN = 8
EXACT_SEARCH_BLOCK = 65_536

_SPEC_PATTERNS = {
    "flat": re.compile(r"Flat"),
    "hnsw": re.compile(r"HNSW(?P<m>\d+)"),
    "ivf_flat": re.compile(r"IVF(?P<nlist>\d+),Flat"),
    "ivf_pq": re.compile(r"IVF(?P<nlist>\d+),PQ(?P<m>\d+)"),
    "ivf_pq_refine": re.compile(r"IVF(?P<nlist>\d+),PQ(?P<m>\d+),Refine\(SQfp16\)"),
}


def _parse_spec(spec: str) -> tuple[str, dict[str, int]]:
    """Split an index_factory string of the supported vocabulary into kind and sizes."""
    for kind, pattern in _SPEC_PATTERNS.items():
        match = pattern.fullmatch(spec)
        if match:
            return kind, {name: int(value) for name, value in match.groupdict().items()}
    raise ValueError(
        f"unsupported index spec {spec!r}; expected Flat, HNSW<M>, IVF<nlist>,Flat, "
        "IVF<nlist>,PQ<m> or IVF<nlist>,PQ<m>,Refine(SQfp16)"
    )


def index_memory_bytes(spec: str, num_vectors: int, dim: int) -> int:
    """Estimate the RAM an index of ``spec`` holding ``num_vectors`` vectors needs.

    Flat stores float32 vectors; HNSW adds 2*M int32 links per vector on its base layer
    (upper layers add ~1/M of that); IVF stores an int64 id per vector plus the float32
    coarse centroids; PQ stores m one-byte codes per vector plus 256 float32 centroids
    per sub-quantizer; Refine(SQfp16) adds the float16 vectors (2 bytes per dimension) that
    re-rank the short list. Used by :func:`choose_index_spec` and reported by the speed measurements (bench/knn.py).
    """
    kind, sizes = _parse_spec(spec)
    raw_vector = 4 * dim
    if kind == "flat":
        return num_vectors * raw_vector
    if kind == "hnsw":
        links = 4 * 2 * sizes["m"] * (1 + 1 / sizes["m"])
        return int(num_vectors * (raw_vector + links + 12))
    centroids = sizes["nlist"] * raw_vector
    if kind == "ivf_flat":
        return num_vectors * (raw_vector + 8) + centroids
    codebooks = PQ_CENTROIDS_PER_SUBQUANTIZER * raw_vector
    refine = num_vectors * 2 * dim if kind == "ivf_pq_refine" else 0
    return num_vectors * (sizes["m"] + 8) + centroids + codebooks + refine


def ivf_list_count(num_vectors: int) -> int:
    """4*sqrt(n) rounded to the nearest power of two, with >= 39 training points per list."""
    target = 4 * math.sqrt(num_vectors)
    nlist = 2 ** round(math.log2(target))
    max_by_training = max(1, num_vectors // MIN_TRAIN_POINTS_PER_CENTROID)
    while nlist > max_by_training:
        nlist //= 2
    return max(1, nlist)


def choose_index_spec(num_vectors: int, dim: int, memory_budget_bytes: int) -> str:
    """Pick a faiss index_factory string for a collection and a RAM budget.

    Rules, first match wins (``fits`` = :func:`index_memory_bytes` <= budget):

    1. ``Flat`` (exact) when n < 50,000 and it fits: exact search is cheap there and IVF
       would lack training points (~1024 lists x 39 points).
    2. ``HNSW32`` when n < 100,000 and vectors + graph fit: quick to build at that size and
       IVF would have few, coarse lists. Above it IVF-Flat won on every measurement
       (bench/knn.py, 200k x 512 clustered: IVF-Flat 13x faster than exact at
       recall@20 0.991 and half the build time; HNSW32 2.4x at 0.939).
    3. ``IVF{nlist},Flat`` when the raw float32 vectors fit; nlist = 4*sqrt(n) rounded to
       a power of two, halved until every list has >= 39 training points.
    4. ``IVF{nlist},PQ{m},Refine(SQfp16)`` when IVF-PQ codes plus the float16 vectors
       fit (about half of IVF-Flat's float32): m = dim/2 bytes (<= 64) find a short list
       of a few k candidates, which the float16 vectors re-rank exactly; plain IVF-PQ
       plateaus below the recall target (docs/benchmarks/knn.md).
    5. ``IVF{nlist},PQ{m}`` with 8-bit codes, m the largest divisor of dim (<= 64) that
       fits: compresses each vector to m bytes when not even float16 vectors fit.

    Raises ValueError for non-positive sizes or a budget too small even for ``PQ1``.
    """
    if num_vectors <= 0 or dim <= 0:
        raise ValueError(f"need num_vectors > 0 and dim > 0, got {num_vectors} and {dim}")

    def fits(spec: str) -> bool:
        return index_memory_bytes(spec, num_vectors, dim) <= memory_budget_bytes

    if num_vectors < FLAT_MAX_VECTORS and fits("Flat"):
        return "Flat"
    hnsw = f"HNSW{HNSW_NEIGHBORS}"
    if num_vectors < HNSW_MAX_VECTORS and fits(hnsw):
        return hnsw
    nlist = ivf_list_count(num_vectors)
    if fits(f"IVF{nlist},Flat"):
        return f"IVF{nlist},Flat"
    limit = min(MAX_PQ_SUBQUANTIZERS, max(1, dim // REFINE_DIMS_PER_CODE))
    refine_m = max(m for m in range(1, limit + 1) if dim % m == 0)
    refined = f"IVF{nlist},PQ{refine_m}{REFINED}"
    if fits(refined):
        return refined
    for m in range(min(dim, MAX_PQ_SUBQUANTIZERS), 0, -1):
        if dim % m == 0 and fits(f"IVF{nlist},PQ{m}"):
            return f"IVF{nlist},PQ{m}"
    smallest = index_memory_bytes(f"IVF{nlist},PQ1", num_vectors, dim)
    raise ValueError(
        f"memory budget {memory_budget_bytes} B is below the smallest index for "
        f"{num_vectors} x {dim} vectors (IVF{nlist},PQ1 needs ~{smallest} B)"
    )


def _check_matrix(vectors: np.ndarray, name: str, dim: int | None = None) -> None:
    """Reject inputs faiss would misread or crash on, with a message naming the input."""
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2:
        raise ValueError(f"{name} must be a 2-D numpy array, got shape {np.shape(vectors)}")
    if dim is not None and vectors.shape[1] != dim:
        raise ValueError(f"{name} has dimension {vectors.shape[1]}, index has {dim}")


def _as_float32(batch: np.ndarray, name: str) -> np.ndarray:
    """Convert one batch for faiss; NaN/inf would silently poison distances."""
    converted = np.ascontiguousarray(batch, dtype=np.float32)
    if not np.isfinite(converted).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return converted


def _sample_rows(num_rows: int, sample_size: int, seed: int) -> np.ndarray:
    """Sorted seeded row sample (sorted so memory-mapped reads stay sequential)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_rows, size=min(sample_size, num_rows), replace=False))


def _gpu_eligible(index: faiss.Index) -> bool:
    """Whether faiss has a GPU version of this CPU index and a GPU to put it on."""
    if faiss.get_num_gpus() == 0:
        return False
    return type(faiss.downcast_index(index)) in (
        faiss.IndexFlat, faiss.IndexFlatIP, faiss.IndexIVFFlat, faiss.IndexIVFPQ
    )


def to_gpu(index: faiss.Index) -> tuple[faiss.Index, bool]:
    """(a copy of ``index`` on all GPUs, True), or (``index``, False) when faiss has no GPU,
    no GPU version of the index, or refuses this configuration (e.g. an IVF-PQ code size
    its kernels lack)."""
    if not _gpu_eligible(index):
        return index, False
    try:
        return faiss.index_cpu_to_all_gpus(index), True
    except RuntimeError:
        return index, False


def _exact_neighbors(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k inner-product labels, scanning the collection block by block."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start in range(0, len(vectors), EXACT_SEARCH_BLOCK):
        block = _as_float32(vectors[start : start + EXACT_SEARCH_BLOCK], "vectors")
        scores, labels = faiss.knn(
            queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT
        )
        heap.add_result(scores, np.where(labels >= 0, labels + start, -1))
    heap.finalize()
    return heap.I


def label_recall(found_labels: np.ndarray, exact_labels: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k labels that a search also returned.

    Both are (queries, k) label matrices as faiss returns them; -1 padding is ignored.
    """
    hits = sum(
        len(np.intersect1d(found[found >= 0], truth[truth >= 0]))
        for found, truth in zip(found_labels, exact_labels)
    )
    return hits / max(1, int((exact_labels >= 0).sum()))


def _search_recall(index: faiss.Index, queries: np.ndarray, exact_labels: np.ndarray) -> float:
    return label_recall(index.search(queries, exact_labels.shape[1])[1], exact_labels)


def recall_at_k(
    index: faiss.Index,
    vectors: np.ndarray,
    k: int = 20,
    sample_size: int = 1000,
    seed: int = 0,
) -> float:
    """Recall@k of ``index`` against exact search, queried with a seeded sample of
    the indexed ``vectors`` (the pipeline's own use: every image queries the index)."""
    _check_matrix(vectors, "vectors", index.d)
    if len(vectors) != index.ntotal:
        raise ValueError(f"index holds {index.ntotal} vectors, got {len(vectors)}")
    queries = _as_float32(vectors[_sample_rows(len(vectors), sample_size, seed)], "vectors")
    return _search_recall(index, queries, _exact_neighbors(vectors, queries, min(k, len(vectors))))


def _search_knobs(index: faiss.Index) -> list[tuple[str, int, int]]:
    """(faiss parameter name, first value, upper bound) of each knob that trades speed for
    recall: efSearch (HNSW), nprobe (IVF), and the short list's k_factor (refined IVF-PQ)."""
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return [("efSearch", 16, MAX_EF_SEARCH)]
    ivf = faiss.try_extract_index_ivf(index)
    knobs = [] if ivf is None else [("nprobe", 1, ivf.nlist)]
    if isinstance(index, faiss.IndexRefine):
        knobs.append(("k_factor_rf", REFINE_K_FACTOR, MAX_REFINE_K_FACTOR))
    return knobs


def _tune_search_parameters(
    index: faiss.Index, knobs: list[tuple[str, int, int]], vectors: np.ndarray, seed: int
) -> None:
    """Greedy doubling: each round doubles the knob whose doubling gains most recall, until
    the recall target is met or no doubling gains TUNING_MIN_GAIN (a plateau)."""
    queries = _as_float32(vectors[_sample_rows(len(vectors), TUNING_SAMPLE_SIZE, seed)], "vectors")
    exact = _exact_neighbors(vectors, queries, min(TUNING_K, len(vectors)))
    params = faiss.ParameterSpace()
    values = {name: first for name, first, _ in knobs}
    for name, value in values.items():
        params.set_index_parameter(index, name, value)
    best = _search_recall(index, queries, exact)
    while best < TARGET_RECALL + TUNING_MARGIN:
        trials = []  # (recall, name, value) of each knob doubled alone
        for name, _, upper in knobs:
            if values[name] < upper:
                candidate = min(2 * values[name], upper)
                params.set_index_parameter(index, name, candidate)
                trials.append((_search_recall(index, queries, exact), name, candidate))
                params.set_index_parameter(index, name, values[name])
        if not trials or max(trials)[0] - best < TUNING_MIN_GAIN:
            return
        best, name, values[name] = max(trials)
        params.set_index_parameter(index, name, values[name])


def build_index(
    vectors: np.ndarray,
    spec: str,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    train_size: int = 100_000,
    add_batch_size: int = 65_536,
    seed: int = 0,
) -> faiss.Index:
    """Build an inner-product faiss index of type ``spec`` over ``vectors``.

    Indexes that need training (IVF) are trained on a seeded random sample of
    ``train_size`` rows, enlarged to 39 * nlist rows when that is more (k-means needs
    that many points per centroid). Vectors are added in batches of ``add_batch_size``,
    converted to float32 per batch. ``nprobe`` (IVF), ``ef_search`` (HNSW) and, for
    Refine, the short list's k_factor are tuned by doubling until recall@20 reaches 0.96
    on a 500-vector sample, or to where doubling stops helping (IVF-PQ's quantisation caps
    its recall); given ``nprobe``, k_factor stays at its first value, 2. Training and adding
    run on the GPUs when :func:`to_gpu` can move the index; tuning runs on the CPU copy.
    """
    _check_matrix(vectors, "vectors")
    if len(vectors) == 0:
        raise ValueError("cannot build an index over 0 vectors")
    _, sizes = _parse_spec(spec)
    index = faiss.index_factory(vectors.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
        # Polysemous training orders PQ codes for Hamming pre-filtering, which we never
        # use; it took 2/3 of IVF-PQ build time on 20k x 64 vectors.
        faiss.downcast_index(ivf).do_polysemous_training = False
    filled, on_gpu = to_gpu(index)
    if not filled.is_trained:
        wanted = max(train_size, MIN_TRAIN_POINTS_PER_CENTROID * sizes.get("nlist", 1))
        sample = _sample_rows(len(vectors), wanted, seed)
        filled.train(_as_float32(vectors[sample], "vectors"))
    for start in range(0, len(vectors), add_batch_size):
        filled.add(_as_float32(vectors[start : start + add_batch_size], "vectors"))
    index = faiss.index_gpu_to_cpu(filled) if on_gpu else filled

    explicit = {"nprobe": nprobe, "efSearch": ef_search}
    knobs = _search_knobs(index)
    if any(explicit.get(name) is not None for name, _, _ in knobs):
        for name, first, _ in knobs:
            faiss.ParameterSpace().set_index_parameter(index, name, explicit.get(name) or first)
    elif knobs:
        _tune_search_parameters(index, knobs, vectors, seed)
    return index


def search_neighbors(
    index: faiss.Index,
    index_ids: np.ndarray,
    queries: np.ndarray,
    query_ids: np.ndarray,
    k: int = 20,
    batch_size: int = 4096,
) -> pd.DataFrame:
    """Top-k neighbours of each query, excluding the query's own image.

    ``index_ids[i]`` is the image id of the i-th vector added to ``index``. Ids are
    content hashes, so a neighbour with the query's id is the query itself or an identical
    copy and is dropped; an id found twice keeps only its best score; faiss's -1 padding
    is dropped. Searches k + 8 so that removals rarely leave fewer than k neighbours, on the
    GPUs when :func:`to_gpu` can move the index.

    Returns one row per query, in ``query_ids`` order: ``image_id`` (int64),
    ``neighbor_ids`` (int64 array, length <= k), ``scores`` (float32 array, descending).
    """
    _check_matrix(queries, "queries", index.d)
    index_ids = np.asarray(index_ids, dtype=np.int64)
    query_ids = np.asarray(query_ids, dtype=np.int64)
    if len(index_ids) != index.ntotal:
        raise ValueError(f"index holds {index.ntotal} vectors but got {len(index_ids)} index_ids")
    if len(query_ids) != len(queries):
        raise ValueError(f"got {len(queries)} queries but {len(query_ids)} query_ids")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")

    fetched = min(k + SELF_AND_DUPLICATE_MARGIN, max(1, index.ntotal))
    searcher, _ = to_gpu(index)
    kept_ids, kept_scores, counts = [], [], []
    for start in range(0, len(queries), batch_size):
        batch_ids = query_ids[start : start + batch_size]
        scores, labels = searcher.search(
            _as_float32(queries[start : start + batch_size], "queries"), fetched
        )
        ids, scores, keep = _filter_neighbors(scores, labels, index_ids, batch_ids, k)
        kept_ids.append(ids[keep])
        kept_scores.append(scores[keep])
        counts.append(keep.sum(axis=1))

    counts = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
    return pd.DataFrame(
        {
            "image_id": query_ids,
            "neighbor_ids": _split_rows(kept_ids, counts, np.int64),
            "scores": _split_rows(kept_scores, counts, np.float32),
        }
    )


def _split_rows(parts: list[np.ndarray], counts: np.ndarray, dtype: type) -> list[np.ndarray]:
    """One array per query, as views into a single flat buffer (cheap per row)."""
    if len(counts) == 0:
        return []
    return np.split(np.concatenate(parts).astype(dtype, copy=False), np.cumsum(counts)[:-1])


def _filter_neighbors(
    scores: np.ndarray,
    labels: np.ndarray,
    index_ids: np.ndarray,
    query_ids: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised per-row filtering of one search batch.

    Returns (ids, scores, keep): rows sorted by descending score and a mask keeping, per
    row, the first k entries that are real, not the query's id and first of their id.
    """
    order = np.argsort(-scores, axis=1, kind="stable")
    scores = np.take_along_axis(scores, order, axis=1)
    labels = np.take_along_axis(labels, order, axis=1)
    # Padding is mapped to the query's own id so that one rule removes both.
    ids = np.where(labels >= 0, index_ids[np.maximum(labels, 0)], query_ids[:, None])
    by_id = np.argsort(ids, axis=1, kind="stable")  # stable: best score first per id
    sorted_ids = np.take_along_axis(ids, by_id, axis=1)
    first_of_id = np.ones_like(sorted_ids, dtype=bool)
    first_of_id[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    keep = np.empty_like(first_of_id)
    np.put_along_axis(keep, by_id, first_of_id, axis=1)
    keep &= ids != query_ids[:, None]
    keep &= np.cumsum(keep, axis=1) <= k
    return ids, scores.astype(np.float32, copy=False), keep


def serialize_index(index: faiss.Index) -> bytes:
    """The index as bytes, for an artifact store that writes files atomically.

    faiss's format stores nprobe (IVF) and efSearch (HNSW), so tuned search parameters
    survive :func:`deserialize_index` without being re-applied.
    """
    return faiss.serialize_index(index).tobytes()


def deserialize_index(data: bytes) -> faiss.Index:
    """Inverse of :func:`serialize_index`."""
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
