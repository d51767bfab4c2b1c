"""Code versions that follow configuration, so a config change shows the assets it affects stale.

An asset's code version is its declared version plus a short hash of the settings that shape its
output (``"1+3fa2c9d0"``). Change a mining window and ``image_pairs`` (and ``view_report``) show
"code version changed" in the UI; their children follow once they are recomputed, through
Dagster's own data versions, so an asset names only the settings it reads itself. Settings
declared ``unversioned`` in ``resources/settings.py`` (device, batch sizes, paths) never count.
Settings given as environment variables (the paper profile) count by the variable's name: its
value is neither read nor needed when the definitions load.

Per-run overrides of resource config (launchpad, ``-c run_config.yaml``) are not seen here: the
version follows the configuration the code location was loaded with.
"""

import hashlib
import json
from collections.abc import Iterable, Mapping

from dagster import ConfigurableResource, EnvVar, map_asset_specs

from megapairs_dagster.resources.settings import versioned_fields

VERSIONED_BY = "megapairs/versioned_by"


def versioned_by(*selectors: str) -> dict[str, list[str]]:
    """Asset metadata naming the settings that shape the asset's output: a resource key (all its
    versioned settings) or ``"resource.setting"``. Declared on the decorator, shown in the UI,
    and hashed into the code version by :func:`with_config_versions`. An asset that takes
    everything from its inputs (embeddings take their encoder from base_encoders) names none."""
    return {VERSIONED_BY: list(selectors)}


def settings_hash(resources: Mapping[str, ConfigurableResource], selectors: Iterable[str]) -> str:
    """Eight hex digits of a stable hash of the selected settings."""
    chosen = {}
    for selector in selectors:
        key, _, name = selector.partition(".")
        resource = resources[key]
        for field in [name] if name else versioned_fields(resource):
            chosen[f"{key}.{field}"] = _plain(getattr(resource, field), f"{key}.{field}")
    text = json.dumps(chosen, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _plain(value, where: str):
    if isinstance(value, EnvVar):
        return {"env": value.env_var_name}
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, where) for v in value]
    if value is None or type(value) in (str, int, float, bool):
        return value
    raise TypeError(
        f"{where}: {type(value).__name__} is not plain data and cannot be hashed "
        "into a code version"
    )


def with_config_versions(assets: Iterable, resources: Mapping[str, ConfigurableResource]) -> list:
    """The same assets, each with its code version extended by the hash of its settings."""

    def version(spec):
        selectors = (spec.metadata or {}).get(VERSIONED_BY)
        if not selectors:
            return spec
        return spec.replace_attributes(
            code_version=f"{spec.code_version}+{settings_hash(resources, selectors)}"
        )

    return list(map_asset_specs(version, assets))
