"""Dagster assets, one module per stage; the work itself lives in the domain packages."""
