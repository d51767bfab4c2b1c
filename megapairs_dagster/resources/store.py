"""The artifact store as a Dagster resource, and the IO manager that stores assets in it."""


import json
from typing import Any

import pandas as pd
import pyarrow as pa
from dagster import (
    ConfigurableIOManagerFactory,
    ConfigurableResource,
    InitResourceContext,
    InputContext,
    MetadataValue,
    OutputContext,
    ResourceDependency,
    TableColumn,
    TableSchema,
    UPathIOManager,
)
from upath import UPath

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
from megapairs_dagster.storage import ArtifactStoreClient, S3Retries


class ArtifactStore(ConfigurableResource):
    """Root of every artifact: a local folder, or ``s3://bucket/prefix`` through s3fs.

    S3 credentials are never configuration: s3fs reads them from the environment
    (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or an instance profile). The retry and
    timeout settings apply to an S3 store only; a read or write that still fails raises
    ``ArtifactStoreError`` naming the object.
    """

    url: str = unversioned("data/artifacts", description="Local folder or s3://bucket/prefix.")
    endpoint_url: str | None = unversioned(
        None, description="S3-compatible endpoint (MinIO, moto); None for AWS."
    )
    cache_dir: str | None = unversioned(
        None, description="Local copies of a remote store's model folders; default: one "
        "folder per store URL under ~/.cache/megapairs (a local store is read in place).",
    )
    retry_attempts: int = unversioned(
        S3Retries.attempts, ge=1, description="Tries of each S3 request (the first included) "
        "on 5xx, throttling, connection errors and timeouts, with jittered exponential backoff.",
    )
    connect_timeout_s: float = unversioned(
        S3Retries.connect_timeout_s, gt=0, description="Seconds to open a connection to S3."
    )
    read_timeout_s: float = unversioned(
        S3Retries.read_timeout_s, gt=0,
        description="Seconds S3 may stay silent while a response is awaited or read.",
    )

    def s3_retries(self) -> S3Retries:
        return S3Retries(self.retry_attempts, self.connect_timeout_s, self.read_timeout_s)

    def storage_options(self) -> dict[str, Any]:
        return {"client_kwargs": {"endpoint_url": self.endpoint_url}} if self.endpoint_url else {}

    def client(self) -> ArtifactStoreClient:
        return ArtifactStoreClient(self.url, self.storage_options(), self.cache_dir,
                                   self.s3_retries())


class ArtifactUPathIOManager(UPathIOManager):
    """Stores DataFrames as parquet, dicts as JSON and matrices as npz in the artifact store.

    Paths are ``artifacts.artifact_relpath``'s layout, the one every reader uses. The suffix
    depends on the object's type, so there is no single ``extension``: writes add it and
    ``load_artifact`` finds it. Every write is atomic (``ArtifactStoreClient.write_bytes``) and
    tagged with the run, asset and partition that produced it.
    """

    def __init__(self, client: ArtifactStoreClient):
        super().__init__(base_path=client.root)
        self._client = client

    def get_asset_relative_path(self, context: InputContext | OutputContext) -> UPath:
        """``<asset>/data`` for an unpartitioned asset, rather than the base class's ``<asset>``."""
        if context.has_asset_partitions:
            return super().get_asset_relative_path(context)
        return UPath(artifact_relpath(context.asset_key.path, None))

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        """The base class refuses a run over several partitions and records the path without
        the suffix; here such a run returns ``{partition: value}`` and each is written."""
        if obj is None:
            return
        tables = [v for v in (obj.values() if isinstance(obj, dict) else [obj])
                  if isinstance(v, pd.DataFrame)]
        if tables:
            context.add_output_metadata({"dagster/column_schema": column_schema(tables[0])})
        if not context.has_asset_partitions:
            self.dump_to_path(context, obj, self._get_path(context))
            return
        paths = self._get_paths_for_partitions(context)
        if context.has_partition_key:
            self.dump_to_path(context, obj, paths[context.asset_partition_key])
            return
        if not isinstance(obj, dict) or set(obj) != set(paths):
            raise TypeError(
                f"{context.asset_key.to_user_string()} ran for partitions {sorted(paths)} "
                "and must return a dict with exactly those keys"
            )
        for partition, value in obj.items():
            self._write(context, value, paths[partition], partition)

    def dump_to_path(self, context: OutputContext, obj: Any, path: UPath) -> None:
        partition = context.asset_partition_key if context.has_asset_partitions else None
        written, size = self._write(context, obj, path, partition)
        context.add_output_metadata(
            {"path": MetadataValue.path(str(written)), "bytes": MetadataValue.int(size)}
        )

    def _write(
        self, context: OutputContext, obj: Any, path: UPath, partition: str | None
    ) -> tuple[UPath, int]:
        produced_by = {
            "run_id": context.run_id,
            "asset": context.asset_key.to_user_string(),
            "partition": partition,
            "code_version": context.asset_spec.code_version,
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
        return self._client.write_bytes(self._relpath(path) + suffix, data), len(data)

    def load_from_path(self, context: InputContext, path: UPath) -> Any:
        return load_artifact(self._client, self._relpath(path))

    def load_input(self, context: InputContext) -> Any:
        """No partitions yet reads as ``{}`` (the base class gives None, which fails a dict input)."""
        if context.has_asset_partitions and not context.asset_partition_keys:
            return {}
        return super().load_input(context)

    def load_partitions(self, context: InputContext) -> Any:
        """A partitioned step reading its own partition gets the value; any other reader gets
        ``{partition: value}`` sorted by key, even for one partition (the base class would
        hand that one over bare)."""
        loaded = super().load_partitions(context)
        keys = context.asset_partition_keys
        if len(keys) == 1:
            if context.has_partition_key:
                return loaded
            loaded = {} if loaded is None else {keys[0]: loaded}
        return dict(sorted(loaded.items()))

    def _relpath(self, path: UPath) -> str:
        return path.relative_to(self._client.root).as_posix()


class ArtifactIOManager(ConfigurableIOManagerFactory):
    """The IO manager over the same ``ArtifactStore`` resource the assets use, so one store
    configuration (URL, endpoint; credentials from the environment) serves both."""

    store: ResourceDependency[ArtifactStore]

    def create_io_manager(self, context: InitResourceContext) -> ArtifactUPathIOManager:
        return ArtifactUPathIOManager(self.store.client())


def column_schema(frame: pd.DataFrame) -> TableSchema:
    """The table's columns with their Parquet (Arrow) types, as the UI shows a table's schema."""
    schema = pa.Schema.from_pandas(frame, preserve_index=False)
    return TableSchema(columns=[TableColumn(field.name, str(field.type)) for field in schema])
