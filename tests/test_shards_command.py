"""`megapairs shards list|register`: shards from the shell, without the daemon; an instance
belongs to one deployment."""

import shutil
from pathlib import Path

import pytest
from dagster import DagsterInstance, build_sensor_context

from megapairs_dagster.cli import main
from megapairs_dagster.demo import write_demo_shard
from megapairs_dagster.jobs.sensors import shard_sensor
from megapairs_dagster.resources.profiles import resources_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def deployment(tmp_path, monkeypatch):
    home = tmp_path / "home"
    for shard in (0, 1):
        write_demo_shard(home / "demo_corpus", shard, 4, seed=0)
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(REPO / "config" / "dagster.yaml", dagster_home / "dagster.yaml")
    for name, value in {"MEGAPAIRS_PROFILE": "demo", "MEGAPAIRS_HOME": str(home),
                        "DAGSTER_HOME": str(dagster_home)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MEGAPAIRS_CONFIG", raising=False)
    return home, dagster_home


def _partitions(dagster_home) -> list[str]:
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        return instance.get_dynamic_partitions("shards")


def test_register_adds_the_sources_shards_once(deployment, capsys):
    _, dagster_home = deployment
    main(["shards", "list"])
    assert "2 shards at" in capsys.readouterr().out and _partitions(dagster_home) == []
    main(["shards", "register"])
    assert "2 registered: 00000, 00001" in capsys.readouterr().out
    assert _partitions(dagster_home) == ["00000", "00001"]
    main(["shards", "register"])
    assert "0 registered" in capsys.readouterr().out


def test_an_instance_refuses_a_second_deployment(deployment, tmp_path, monkeypatch):
    home, dagster_home = deployment
    main(["shards", "register"])
    other = tmp_path / "other"
    shutil.copytree(home / "demo_corpus", other / "demo_corpus")
    monkeypatch.setenv("MEGAPAIRS_HOME", str(other))
    with pytest.raises(SystemExit, match=f"belongs to the deployment whose store is {home}"):
        main(["shards", "register"])
    # the sensor of that deployment skips, saying the same, and registers nothing
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        resources = resources_for("demo", str(other))
        with build_sensor_context(instance=instance, resources=resources) as context:
            result = shard_sensor(context)
        assert "belongs to the deployment" in result.skip_message
    assert _partitions(dagster_home) == ["00000", "00001"]
