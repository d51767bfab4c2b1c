"""Jobs, derived from the asset groups, and the sensors (new shards, automation)."""

from collections.abc import Iterable

from dagster import AssetsDefinition, AssetSelection, define_asset_job

from megapairs_dagster.jobs.automation import automation_sensor
from megapairs_dagster.jobs.sensors import shard_sensor

sensors = [shard_sensor, automation_sensor]


def build_jobs(assets: Iterable[AssetsDefinition]) -> list:
    """One job per asset group, named after it (``synthesis`` materialises the synthesis
    group for the shards it is launched with). A group's assets share one partitioning, so
    each job launches with the partitions of its assets; a new asset joins its group's job."""
    groups: dict[str, list[AssetsDefinition]] = {}
    for definition in assets:
        for group in set(definition.group_names_by_key.values()):
            groups.setdefault(group, []).append(definition)
    jobs = []
    for group, members in sorted(groups.items()):
        partitionings = {repr(member.partitions_def) for member in members}
        if len(partitionings) > 1:
            raise ValueError(
                f"asset group {group!r} mixes partitionings ({sorted(partitionings)}): a group "
                "is one job, so give each partitioning its own group"
            )
        names = sorted({key.to_user_string() for member in members for key in member.keys})
        jobs.append(define_asset_job(
            group, selection=AssetSelection.groups(group),
            description=f"Materialise the {group} group: {', '.join(names)}.",
        ))
    return jobs
