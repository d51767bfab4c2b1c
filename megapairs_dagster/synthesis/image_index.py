"""Where every image lives: image id → (shard, row) of the shard's ``corpus_images`` table.

Mining pairs an image with neighbours from any shard, so the generation steps, training and
the export need a few rows of many other shards. One global index answers "which shard, which
row" for all of them, and shard tables are written in small row groups, so a reader fetches
only the row groups that hold the rows it needs (a ranged read on S3) instead of every shard.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa

from megapairs_dagster.artifacts import ROW_GROUP_ROWS, open_parquet, read_table
from megapairs_dagster.storage import ArtifactStoreClient

INDEX_COLUMNS = ["image_id", "shard", "row"]
CORPUS_TABLE = "corpus_images"


def shard_table_path(shard: str) -> str:
    """The store path of a shard's normalised images (what the IO manager writes)."""
    return f"{CORPUS_TABLE}/{shard}.parquet"


def shard_entries(store: ArtifactStoreClient, shard: str) -> pd.DataFrame:
    """The index rows of one shard, reading only its ``image_id`` column."""
    with store.path(shard_table_path(shard)).open("rb") as handle:
        ids = read_table(handle, columns=["image_id"])["image_id"].to_numpy()
    return pd.DataFrame(
        {"image_id": ids.astype(np.int64), "shard": shard, "row": np.arange(len(ids), dtype=np.int64)}
    )


def build_image_index(
    store: ArtifactStoreClient, shards: Iterable[str], previous: pd.DataFrame | None = None,
    reuse: Iterable[str] = (),
) -> pd.DataFrame:
    """The index over ``shards``: the ``reuse`` shards' rows come from ``previous`` (their
    tables did not change), the others are read from the store. Sorted by image id."""
    shards, reuse = sorted(set(shards)), set(reuse)
    frames = []
    if previous is not None and reuse:
        frames.append(previous[previous["shard"].isin(reuse & set(shards))][INDEX_COLUMNS])
    frames += [shard_entries(store, shard) for shard in shards if shard not in reuse]
    if not frames:
        return pd.DataFrame({"image_id": pd.Series(dtype="int64"), "shard": pd.Series(dtype=str),
                             "row": pd.Series(dtype="int64")})
    index = pd.concat(frames, ignore_index=True)
    index["shard"] = index["shard"].astype(str)
    return index.sort_values(["image_id", "shard"], kind="stable").reset_index(drop=True)


def locate(index: pd.DataFrame, image_ids: Iterable[int]) -> pd.DataFrame:
    """The (shard, row) of each id (its first copy if several shards hold it); a clear error
    names ids the index does not hold."""
    wanted = np.unique(np.fromiter((int(i) for i in image_ids), dtype=np.int64))
    ids = index["image_id"].to_numpy()
    positions = np.searchsorted(ids, wanted)
    found = (positions < len(ids)) & (ids[np.minimum(positions, len(ids) - 1)] == wanted) \
        if len(ids) else np.zeros(len(wanted), dtype=bool)
    if not found.all():
        missing = wanted[~found]
        raise KeyError(
            f"{len(missing)} image ids are not in image_index, e.g. {missing[:3].tolist()}: "
            "materialise image_index after ingesting every shard the neighbours come from"
        )
    located = index.iloc[positions].reset_index(drop=True)
    return located[INDEX_COLUMNS]


def read_images(
    store: ArtifactStoreClient, index: pd.DataFrame, image_ids: Iterable[int], columns: list[str]
) -> pd.DataFrame:
    """``columns`` of the given images, indexed by image id, reading only the row groups of
    the shards that hold them."""
    located = locate(index, image_ids)
    frames = [
        _read_rows(store, shard, group["row"].to_numpy(), ["image_id", *columns])
        for shard, group in located.groupby("shard", sort=True)
    ]
    if not frames:
        return pd.DataFrame(columns=["image_id", *columns]).set_index("image_id")
    return pd.concat(frames, ignore_index=True).set_index("image_id")


def iter_images(
    store: ArtifactStoreClient, index: pd.DataFrame, image_ids: Iterable[int],
    columns: list[str], chunk_rows: int = ROW_GROUP_ROWS,
) -> Iterator[pd.DataFrame]:
    """``read_images`` in chunks of at most ``chunk_rows`` images, in storage order (shard,
    then row), so each chunk reads about one row group and memory holds one chunk."""
    located = locate(index, image_ids).sort_values(["shard", "row"], kind="stable")
    for shard, group in located.groupby("shard", sort=True):
        rows = group["row"].to_numpy()
        for start in range(0, len(rows), chunk_rows):
            yield _read_rows(store, shard, rows[start:start + chunk_rows],
                             ["image_id", *columns]).set_index("image_id")


def _read_rows(store: ArtifactStoreClient, shard: str, rows: np.ndarray, columns: list[str]):
    with store.path(shard_table_path(shard)).open("rb") as handle:
        parquet = open_parquet(handle, columns)
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        groups = np.searchsorted(starts, rows, side="right") - 1
        tables: Mapping[int, pa.Table] = {
            int(g): parquet.read_row_group(int(g), columns=columns, use_threads=False)
            for g in np.unique(groups)
        }
    parts = [
        tables[int(g)].take(pa.array(rows[groups == g] - starts[g])) for g in np.unique(groups)
    ]
    return pa.concat_tables(parts).to_pandas(use_threads=False)
