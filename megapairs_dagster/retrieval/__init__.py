"""Framework-free MMRet retrievers: models, losses, trainer, inference API (no dagster import)."""
