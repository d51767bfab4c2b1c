"""The artifact store as a Dagster resource, and the IO manager that stores assets in it."""


import json
from typing import Any

import pandas as pd
from dagster import (
    ConfigurableIOManager,
    ConfigurableResource,
    InputContext,
    MetadataValue,
    OutputContext,
    ResourceDependency,
)

from megapairs_dagster import __version__
from megapairs_dagster.artifacts import (
    BINARY_ARTIFACTS,
    JSON_SUFFIX,
    TABLE_SUFFIX,
    artifact_relpath,
    load_artifact,
    write_table,
)
from megapairs_dagster.resources.settings import unversioned
from megapairs_dagster.storage import ArtifactStoreClient


class ArtifactStore(ConfigurableResource):
    """Root of every artifact: a local folder, or ``s3://bucket/prefix`` through s3fs.

    S3 credentials are never configuration: s3fs reads them from the environment
    (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or an instance profile).
    """

    url: str = unversioned("data/artifacts", description="Local folder or s3://bucket/prefix.")
    endpoint_url: str | None = unversioned(
        None, description="S3-compatible endpoint (MinIO, moto); None for AWS."
    )
    cache_dir: str | None = unversioned(
        None, description="Local copies of a remote store's model folders; default: one "
        "folder per store URL under ~/.cache/megapairs (a local store is read in place).",
    )

    def storage_options(self) -> dict[str, Any]:
        return {"client_kwargs": {"endpoint_url": self.endpoint_url}} if self.endpoint_url else {}

    def client(self) -> ArtifactStoreClient:
        return ArtifactStoreClient(self.url, self.storage_options(), self.cache_dir)


class ArtifactIOManager(ConfigurableIOManager):
    """Stores DataFrames as parquet, dicts as JSON and matrices as npz in the artifact store.

    Every write is atomic and tagged with the run, asset and partition that produced it.
    A non-partitioned asset reading a partitioned one receives ``{partition: value}``.
    """

    store: ResourceDependency[ArtifactStore]

    def _client(self) -> ArtifactStoreClient:
        return self.store.client()

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        if obj is None:
            return
        if context.has_asset_partitions and not context.has_partition_key:
            # A run over several partitions returns {partition: value}.
            expected = set(context.asset_partition_keys)
            if not isinstance(obj, dict) or set(obj) != expected:
                raise TypeError(
                    f"{context.asset_key.to_user_string()} ran for partitions {sorted(expected)} "
                    "and must return a dict with exactly those keys"
                )
            for partition, value in obj.items():
                self._write(context, value, partition)
            return
        self._write(context, obj, context.partition_key if context.has_partition_key else None)

    def _write(self, context: OutputContext, obj: Any, partition: str | None) -> None:
        relpath = artifact_relpath(context.asset_key.path, partition)
        produced_by = {
            "run_id": context.run_id,
            "asset": context.asset_key.to_user_string(),
            "partition": partition,
            "code_version": context.definition_metadata.get("code_version")
            if context.definition_metadata
            else None,
            "package_version": __version__,
        }
        if isinstance(obj, pd.DataFrame):
            suffix, data = TABLE_SUFFIX, write_table(obj, produced_by)
        elif isinstance(obj, dict):
            suffix, data = JSON_SUFFIX, json.dumps(obj, indent=1, sort_keys=True).encode()
        elif isinstance(obj, BINARY_ARTIFACTS):
            obj.produced_by = {**produced_by, **obj.produced_by}
            suffix, data = obj.SUFFIX, obj.to_bytes()
        else:
            raise TypeError(
                f"{context.asset_key.to_user_string()} returned {type(obj).__name__}; the artifact "
                "store keeps DataFrames, dicts, Embeddings and KnnIndexArtifact"
            )
        path = self._client().write_bytes(relpath + suffix, data)
        if context.has_partition_key or partition is None:
            context.add_output_metadata(
                {"path": MetadataValue.path(str(path)), "bytes": MetadataValue.int(len(data))}
            )

    def load_input(self, context: InputContext) -> Any:
        client = self._client()
        key_path = context.asset_key.path
        if not context.has_asset_partitions:
            return load_artifact(client, artifact_relpath(key_path, None))
        keys = context.asset_partition_keys
        if context.has_partition_key and len(keys) == 1:
            return load_artifact(client, artifact_relpath(key_path, keys[0]))
        return {key: load_artifact(client, artifact_relpath(key_path, key)) for key in sorted(keys)}
