"""Partitions shared by every per-shard asset."""

from dagster import DynamicPartitionsDefinition

# One key per corpus shard; the shard sensor adds keys as shards appear at the source.
shards = DynamicPartitionsDefinition(name="shards")
