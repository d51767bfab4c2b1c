"""Framework-free benchmark readers, metrics and submission files (no dagster import)."""
