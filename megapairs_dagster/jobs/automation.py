"""The automation sensor: evaluates the condition each asset declares on its decorator
(``assets/conditions.py``) and requests what is due."""

import os
import warnings

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    BetaWarning,
    DefaultSensorStatus,
)

with warnings.catch_warnings():
    # `use_user_code_server` is beta in dagster 1.13; nothing else is silenced.
    warnings.filterwarnings("ignore", category=BetaWarning, message=".*use_user_code_server.*")
    automation_sensor = AutomationConditionSensorDefinition(
        "megapairs_automation",
        target=AssetSelection.all(),
        default_status=DefaultSensorStatus.RUNNING,
        # UpdatedAfter is a custom condition: it needs the sensor evaluated in the code server.
        use_user_code_server=True,
        minimum_interval_seconds=int(os.environ.get("MEGAPAIRS_AUTOMATION_INTERVAL_SECONDS", "30")),
        description="Requests each asset's partitions when the automation condition on its "
        "decorator says so: new shards once, stale shards at the nightly catch-up, global "
        "indexes and the export after shards change (assets/conditions.py).",
    )
