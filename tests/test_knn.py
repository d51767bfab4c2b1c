import faiss
import numpy as np
import pytest

from megapairs_dagster.synthesis.knn import (
    build_index,
    choose_index_spec,
    deserialize_index,
    index_memory_bytes,
    label_recall,
    recall_at_k,
    search_neighbors,
    serialize_index,
    to_gpu,
)

GB = 1 << 30
MB = 1 << 20
REFINED_PQ8 = "IVF512,PQ8,Refine(SQfp16)"


def clustered_vectors(num_vectors: int, dim: int, num_clusters: int, seed: int) -> np.ndarray:
    """Normalised Gaussian clusters (random vectors have no neighbourhoods to recall)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.standard_normal((num_vectors, dim)).astype(np.float32) * (0.5 / np.sqrt(dim))
    points = centres[rng.integers(0, num_clusters, num_vectors)] + noise
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float16)


@pytest.fixture(scope="module", autouse=True)
def single_faiss_thread():
    """On tiny data OpenMP start-up and spinning cost more than they save (6x slower
    IVF-PQ training with 2 threads on a busy 2-core machine)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def clustered() -> np.ndarray:
    return clustered_vectors(20_000, 64, num_clusters=400, seed=1)


@pytest.fixture(scope="module")
def built(clustered) -> dict[str, faiss.Index]:
    specs = ["Flat", "HNSW32", "IVF512,Flat", "IVF512,PQ8", REFINED_PQ8]
    return {spec: build_index(clustered, spec) for spec in specs}


@pytest.mark.parametrize(
    ("num_vectors", "dim", "budget", "expected"),
    [
        (10_000, 64, GB, "Flat"),
        (49_999, 512, GB, "Flat"),
        (50_000, 512, GB, "HNSW32"),
        (99_999, 512, 4 * GB, "HNSW32"),
        (200_000, 512, 4 * GB, "IVF2048,Flat"),
        # float32 vectors do not fit, PQ codes plus float16 vectors do: re-ranked IVF-PQ
        (200_000, 512, 300 * MB, "IVF2048,PQ64,Refine(SQfp16)"),
        (200_000, 512, 200 * MB, "IVF2048,PQ64"),
        (1_000_000, 64, 200 * MB, "IVF4096,PQ32,Refine(SQfp16)"),
        (2_000_000, 512, 16 * GB, "IVF4096,Flat"),
        (10_000_000, 512, GB, "IVF16384,PQ64"),
        (10_000_000, 512, 200 * MB, "IVF16384,PQ8"),
        (10_000_000, 768, 200 * MB, "IVF16384,PQ6"),
        # small collection over budget: nlist capped at 5000 // 39 -> 128 lists
        (5_000, 64, MB, "IVF128,PQ32,Refine(SQfp16)"),
        (5_000, 64, 800_000, "IVF128,PQ64"),
    ],
)
def test_choose_index_spec(num_vectors, dim, budget, expected):
    spec = choose_index_spec(num_vectors, dim, budget)
    assert spec == expected
    assert index_memory_bytes(spec, num_vectors, dim) <= budget
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)  # faiss parses it
    assert index.d == dim and index.metric_type == faiss.METRIC_INNER_PRODUCT


def test_choose_index_spec_pq_divides_odd_dimension():
    spec = choose_index_spec(10_000_000, 100, 500 * MB)
    m = int(spec.split("PQ")[1])
    assert 100 % m == 0 and m == 25  # 1e7 * (25 + 8) B fits 500 MB, 50 would not


@pytest.mark.parametrize(
    ("num_vectors", "dim", "budget"), [(0, 64, GB), (100, 0, GB), (1_000_000, 512, 1000)]
)
def test_choose_index_spec_rejects_impossible_inputs(num_vectors, dim, budget):
    with pytest.raises(ValueError):
        choose_index_spec(num_vectors, dim, budget)


@pytest.mark.parametrize(
    ("budget", "expected"),
    [(GB, "Flat"), (600_000, "IVF64,PQ32,Refine(SQfp16)"), (140_000, "IVF64,PQ8")],
)
def test_chosen_specs_build_on_small_data_and_memory_estimate_holds(budget, expected):
    vectors = clustered_vectors(3_000, 64, num_clusters=50, seed=2)
    spec = choose_index_spec(len(vectors), 64, budget)
    assert spec == expected
    index = build_index(vectors, spec)
    assert index.ntotal == 3_000
    actual = len(serialize_index(index))
    assert 0.7 < index_memory_bytes(spec, 3_000, 64) / actual < 1.3


@pytest.mark.parametrize("spec", ["HNSW32", "IVF512,Flat", "IVF512,PQ8", REFINED_PQ8])
def test_memory_estimate_matches_serialized_size(built, spec):
    actual = len(serialize_index(built[spec]))
    assert 0.7 < index_memory_bytes(spec, 20_000, 64) / actual < 1.3


@pytest.mark.parametrize(
    ("spec", "minimum"),
    [
        ("Flat", 1.0),
        ("HNSW32", 0.95),
        ("IVF512,Flat", 0.95),
        # 8-byte codes for 64 dims (32x compression) lose the fine ranking inside a
        # cluster: recall plateaus at ~0.64 whatever nprobe (PQ16 reaches ~0.78 but its
        # 4-dim sub-quantizers take faiss ~20 s to train). Realistic lower bound:
        ("IVF512,PQ8", 0.55),
        # the same codes' short list re-ranked with the float16 vectors
        (REFINED_PQ8, 0.95),
    ],
)
def test_recall_on_clustered_data(built, clustered, spec, minimum):
    assert recall_at_k(built[spec], clustered, k=20, sample_size=1000, seed=3) >= minimum


def test_reranking_beats_the_same_ivf_pq_alone(built, clustered):
    refined = built[REFINED_PQ8]
    assert isinstance(refined, faiss.IndexRefine)
    alone = faiss.downcast_index(refined.base_index)  # same codes and nprobe, no re-ranking
    queries = clustered[:300].astype(np.float32)
    exact = np.argsort(-(queries @ clustered.astype(np.float32).T), axis=1)[:, :20]
    recall_alone = label_recall(alone.search(queries, 20)[1], exact)
    recall_refined = label_recall(refined.search(queries, 20)[1], exact)
    assert recall_refined >= 0.95 and recall_refined > recall_alone + 0.2


def test_tuning_picks_a_useful_nprobe_and_explicit_values_win(built, clustered):
    tuned = faiss.extract_index_ivf(built["IVF512,Flat"]).nprobe
    assert 1 < tuned < 512
    explicit = build_index(clustered, "IVF512,Flat", nprobe=1)
    assert faiss.extract_index_ivf(explicit).nprobe == 1
    assert recall_at_k(explicit, clustered, sample_size=300) < recall_at_k(
        built["IVF512,Flat"], clustered, sample_size=300
    )
    hnsw = build_index(clustered[:2000], "HNSW32", ef_search=77)
    assert faiss.downcast_index(hnsw).hnsw.efSearch == 77


def _expected_neighbors(vectors, index_ids, query, query_id, k):
    """Brute force reference: best score per distinct id, query id excluded."""
    scores = vectors.astype(np.float32) @ query.astype(np.float32)
    best: dict[int, float] = {}
    for image_id, score in zip(index_ids.tolist(), scores.tolist()):
        if image_id != query_id:
            best[image_id] = max(score, best.get(image_id, -np.inf))
    ranked = sorted(best.items(), key=lambda item: -item[1])[:k]
    return [image_id for image_id, _ in ranked], [score for _, score in ranked]


def test_search_neighbors_excludes_self_and_duplicates():
    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index_ids = np.arange(1000, 1300, dtype=np.int64)
    vectors[5] = vectors[3]
    index_ids[5] = index_ids[3]  # the same image stored twice
    index_ids[11] = index_ids[10]  # an id repeated: only its best score may stay
    vectors = vectors.astype(np.float16)
    index = build_index(vectors, "Flat")

    query_rows = np.array([3, 10, 200, 0])  # not in index order
    result = search_neighbors(
        index, index_ids, vectors[query_rows], index_ids[query_rows], k=20, batch_size=3
    )

    assert result["image_id"].tolist() == index_ids[query_rows].tolist()
    assert result["image_id"].dtype == np.int64
    for row, (image_id, neighbors, scores) in zip(query_rows, result.itertuples(index=False)):
        assert neighbors.dtype == np.int64 and scores.dtype == np.float32
        assert image_id not in neighbors
        assert len(set(neighbors.tolist())) == len(neighbors) == 20
        assert np.all(np.diff(scores) <= 0)
        expected_ids, expected_scores = _expected_neighbors(
            vectors, index_ids, vectors[row], image_id, 20
        )
        assert neighbors.tolist() == expected_ids
        np.testing.assert_allclose(scores, expected_scores, atol=1e-5)


def test_search_neighbors_with_k_larger_than_collection():
    vectors = clustered_vectors(10, 8, num_clusters=2, seed=5)
    index_ids = np.array([7, 7, 8, 9, 10, 11, 12, 13, 14, 15], dtype=np.int64)
    result = search_neighbors(build_index(vectors, "Flat"), index_ids, vectors, index_ids, k=50)
    lengths = [len(neighbors) for neighbors in result["neighbor_ids"]]
    # 9 distinct ids: a query sees the 8 others (id 7 counted once)
    assert lengths == [8] * 10
    assert all(-1 not in neighbors for neighbors in result["neighbor_ids"])


def test_search_neighbors_without_queries_returns_empty_frame():
    vectors = clustered_vectors(50, 8, num_clusters=2, seed=6)
    ids = np.arange(50)
    result = search_neighbors(build_index(vectors, "Flat"), ids, vectors[:0], ids[:0])
    assert list(result.columns) == ["image_id", "neighbor_ids", "scores"]
    assert len(result) == 0


@pytest.mark.parametrize("spec", ["HNSW32", "IVF512,Flat", "IVF512,PQ8", REFINED_PQ8])
def test_serialize_round_trip_keeps_results_and_search_parameters(built, clustered, spec):
    index = built[spec]
    restored = deserialize_index(serialize_index(index))
    queries = clustered[:200].astype(np.float32)
    np.testing.assert_array_equal(index.search(queries, 20)[1], restored.search(queries, 20)[1])
    if spec == "HNSW32":
        efs = faiss.downcast_index(index).hnsw.efSearch
        assert faiss.downcast_index(restored).hnsw.efSearch == efs
    else:
        nprobe = faiss.extract_index_ivf(index).nprobe
        assert nprobe > 1 and faiss.extract_index_ivf(restored).nprobe == nprobe
    if spec == REFINED_PQ8:
        assert restored.k_factor == index.k_factor


def test_bad_inputs_raise_clear_errors(built, clustered):
    index = built["Flat"]
    ids = np.arange(len(clustered))
    with pytest.raises(ValueError, match="dimension 32"):
        search_neighbors(index, ids, np.zeros((2, 32), np.float16), ids[:2])
    with pytest.raises(ValueError, match="2-D"):
        build_index(np.zeros(64, np.float16), "Flat")
    with pytest.raises(ValueError, match="0 vectors"):
        build_index(np.zeros((0, 64), np.float16), "Flat")
    with pytest.raises(ValueError, match="NaN"):
        build_index(np.full((10, 4), np.nan, np.float16), "Flat")
    nan_queries = clustered[:2].copy()
    nan_queries[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        search_neighbors(index, ids, nan_queries, ids[:2])
    with pytest.raises(ValueError, match="index_ids"):
        search_neighbors(index, ids[:5], clustered[:2], ids[:2])
    with pytest.raises(ValueError, match="query_ids"):
        search_neighbors(index, ids, clustered[:2], ids[:3])
    with pytest.raises(ValueError, match="unsupported index spec"):
        build_index(clustered, "IVF64,SQ8")


def test_build_from_memory_mapped_float16(tmp_path, clustered):
    """Shards arrive as float16 files; building must not need them loaded as float32."""
    path = tmp_path / "embeddings.f16"
    mapped = np.memmap(path, dtype=np.float16, mode="w+", shape=clustered[:5000].shape)
    mapped[:] = clustered[:5000]
    index = build_index(mapped, "IVF64,Flat", add_batch_size=1000, train_size=3000)
    assert index.ntotal == 5000
    _, labels = index.search(clustered[:5].astype(np.float32), 1)
    assert labels[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_label_recall_counts_shared_labels_and_ignores_padding():
    found = np.array([[1, 2, -1], [5, 6, 7]])
    exact = np.array([[2, 3, -1], [7, 6, 5]])
    assert label_recall(found, exact) == pytest.approx(4 / 5)


@pytest.fixture
def fake_gpu(monkeypatch):
    """One 'GPU' whose index is the CPU index itself: records what was moved each way."""
    moved = {"to": [], "back": []}

    def cpu_to_gpu(index):
        moved["to"].append(index)
        return index

    def gpu_to_cpu(index):
        moved["back"].append(index)
        return index

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", cpu_to_gpu)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", gpu_to_cpu, raising=False)
    return moved


@pytest.mark.parametrize(("spec", "on_gpu"), [
    ("Flat", True), ("IVF16,Flat", True), ("IVF16,PQ8", True),
    ("HNSW32", False), ("IVF16,PQ8,Refine(SQfp16)", False),
])
def test_gpu_branch_moves_only_types_faiss_has_on_gpu(fake_gpu, spec, on_gpu):
    index = faiss.index_factory(64, spec, faiss.METRIC_INNER_PRODUCT)
    assert to_gpu(index) == (index, on_gpu)
    assert fake_gpu["to"] == ([index] if on_gpu else [])


def test_gpu_branch_falls_back_without_gpus_or_when_faiss_refuses(fake_gpu, monkeypatch):
    index = faiss.IndexFlatIP(8)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert to_gpu(index) == (index, False) and fake_gpu["to"] == []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)

    def refuse(_):
        raise RuntimeError("unsupported PQ code size on GPU")

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", refuse)
    assert to_gpu(index) == (index, False)


def test_build_and_search_take_the_gpu_branch_and_return_a_cpu_index(fake_gpu, clustered):
    index = build_index(clustered, "IVF64,Flat", nprobe=8)
    assert len(fake_gpu["to"]) == 1 and fake_gpu["back"] == fake_gpu["to"]
    assert index.ntotal == len(clustered) and faiss.extract_index_ivf(index).nprobe == 8
    ids = np.arange(len(clustered), dtype=np.int64)
    found = search_neighbors(index, ids, clustered[:50], ids[:50], k=5)
    assert fake_gpu["to"][-1] is index and len(fake_gpu["to"]) == 2
    assert all(len(row) == 5 for row in found["neighbor_ids"])
