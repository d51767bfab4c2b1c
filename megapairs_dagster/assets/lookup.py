"""Reading per-image facts (captions, scenes, pixels) across shards without loading it all."""

import pandas as pd

from megapairs_dagster.resources.store import TABLE_SUFFIX, ArtifactStore, load_columns
from megapairs_dagster.synthesis.diagnostics import scenes_from_meta


def ingested_shards(store: ArtifactStore) -> list[str]:
    """Every shard whose ``corpus_images`` is in the store (targets may live in any of them)."""
    folder = store.client().path("corpus_images")
    if not folder.exists():
        return []
    return sorted(p.name[: -len(TABLE_SUFFIX)] for p in folder.iterdir() if p.name.endswith(TABLE_SUFFIX))


def corpus_lookup(store: ArtifactStore, partitions: list[str]) -> tuple[dict, dict]:
    """Captions and (where recorded) scenes of every image of ``partitions``, by image id."""
    table = load_columns(store.client(), "corpus_images", partitions, ["image_id", "caption", "meta"])
    captions = dict(zip(table["image_id"].astype(int), table["caption"]))
    return captions, scenes_from_meta(table["image_id"], table["meta"])


def image_rows(store: ArtifactStore, image_ids, columns: list[str]) -> pd.DataFrame:
    """``columns`` of the given images, indexed by image id, reading only shards that hold them."""
    client, wanted = store.client(), {int(i) for i in image_ids}
    frames = []
    for shard in ingested_shards(store):
        ids = load_columns(client, "corpus_images", [shard], ["image_id"])["image_id"]
        if wanted.intersection(ids.astype(int)):
            table = load_columns(client, "corpus_images", [shard], ["image_id", *columns])
            frames.append(table[table["image_id"].isin(wanted)])
    found = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["image_id"])
    found = found.drop_duplicates("image_id").set_index("image_id")
    missing = wanted - set(found.index.astype(int))
    if missing:
        raise KeyError(f"{len(missing)} image ids are in no ingested shard, e.g. {sorted(missing)[:3]}")
    return found
