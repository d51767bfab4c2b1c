"""Framework-free synthesis code: corpus readers, encoders, KNN indexes, mining.

Nothing in this package imports dagster, so it can be used from a notebook.
"""
