"""Adding an asset touches its own module and ``definitions.py`` only: its automation, nightly
catch-up, code version, job and place in the demo's stage order all follow from its decorator.

The test does what a maintainer would: copies the package, writes one new asset module, adds
it to ``definitions.py``, and loads the changed code location in a fresh interpreter.
"""

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import megapairs_dagster

pytestmark = pytest.mark.slow

PACKAGE = Path(megapairs_dagster.__file__).parent

NEW_MODULE = '''"""``pair_counts`` (per shard): how many pairs each query of the shard got."""

import pandas as pd
from dagster import AssetIn, asset

from megapairs_dagster.assets.code_versions import versioned_by
from megapairs_dagster.assets.conditions import per_shard
from megapairs_dagster.assets.partitions import shards


@asset(
    partitions_def=shards,
    group_name="synthesis",
    ins={"image_pairs": AssetIn()},
    code_version="1",
    metadata=versioned_by("mining.targets_per_query"),
    automation_condition=per_shard(),
)
def pair_counts(image_pairs: pd.DataFrame) -> pd.DataFrame:
    return image_pairs.groupby("query_id").size().rename("pairs").reset_index()
'''

# What the changed code location says about the new asset, and one automation tick after a
# shard has been materialised through everything else.
PROBE = '''
import json
from dagster import AssetKey, AssetMaterialization, DagsterInstance, evaluate_automation_conditions
from megapairs_dagster.definitions import defs
from megapairs_dagster.jobs.pipeline import pipeline_stages

graph = defs.resolve_asset_graph()
node = graph.get(AssetKey("pair_counts"))
stages = [stage.assets for stage in pipeline_stages(graph)]
position = {name: i for i, assets in enumerate(stages) for name in assets}
jobs = [job.name for job in defs.resolve_all_job_defs() if not job.name.startswith("__")
        and AssetKey("pair_counts") in job.asset_layer.selected_asset_keys]
instance = DagsterInstance.ephemeral()
instance.add_dynamic_partitions("shards", ["00000"])
for key in graph.toposorted_asset_keys:
    if key.to_user_string() != "pair_counts":
        partition = "00000" if graph.get(key).partitions_def is not None else None
        if key.to_user_string() not in ("mmret_clip", "benchmark_scores"):
            instance.report_runless_asset_event(AssetMaterialization(key, partition=partition))
        for check in graph.get(key).check_keys:
            if graph.get(check).blocking:
                from dagster import AssetCheckEvaluation
                instance.report_runless_asset_event(AssetCheckEvaluation(
                    asset_key=key, check_name=check.name, passed=True, partition=partition))
result = evaluate_automation_conditions(defs=defs, instance=instance)
requested = {key.to_user_string(): sorted(result.get_requested_partitions(key))
             for key in graph.get_all_asset_keys() if result.get_requested_partitions(key)}
print(json.dumps({
    "jobs": jobs,
    "code_version": node.code_version,
    "condition": node.automation_condition.get_label(),
    "after_pairs": position["pair_counts"] > position["image_pairs"],
    "requested": requested,
}))
'''


def _changed_files(before: Path, after: Path) -> set[str]:
    changed = set()
    for path in after.rglob("*.py"):
        relative = path.relative_to(after)
        original = before / relative
        if not original.exists() or not filecmp.cmp(original, path, shallow=False):
            changed.add(relative.as_posix())
    return changed


def test_a_new_asset_needs_its_module_and_one_line_in_definitions(tmp_path):
    copy = tmp_path / "src" / "megapairs_dagster"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "assets" / "pair_counts.py").write_text(NEW_MODULE)
    definitions = copy / "definitions.py"
    text = definitions.read_text()
    registered = text.replace("    pairs,\n", "    pair_counts,\n    pairs,\n", 1).replace(
        "instructions, triplets]", "instructions, triplets, pair_counts]", 1
    )
    assert registered.count("pair_counts") == 2, "definitions.py no longer lists modules so"
    definitions.write_text(registered)
    assert _changed_files(PACKAGE, copy) == {"assets/pair_counts.py", "definitions.py"}

    env = {**os.environ, "PYTHONPATH": str(copy.parent), "MEGAPAIRS_PROFILE": "demo",
           "MEGAPAIRS_HOME": str(tmp_path / "home")}
    env.pop("MEGAPAIRS_CONFIG", None)
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", PROBE], check=False, env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["jobs"] == ["synthesis"]  # its group's job
    assert seen["code_version"].startswith("1+")  # follows the setting it declared
    assert seen["condition"] == "per_shard"
    assert seen["after_pairs"]  # the demo runs it after the pairs it reads
    assert seen["requested"] == {"pair_counts": ["00000"]}  # automation picks it up
