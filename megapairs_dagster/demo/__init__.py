"""The procedural demo corpus and demo CIR benchmark (no dagster import)."""

from .benchmark import GALLERY_ID_OFFSET, write_demo_benchmark
from .corpus import shard_samples, write_demo_corpus, write_demo_shard
from .relations import RELATION_TYPES, attribute_differences

__all__ = [
    "GALLERY_ID_OFFSET",
    "RELATION_TYPES",
    "attribute_differences",
    "shard_samples",
    "write_demo_benchmark",
    "write_demo_corpus",
    "write_demo_shard",
]
