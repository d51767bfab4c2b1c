"""Eight shards at once through ``triplets``: eight runs of the shipped code location started
together on one Postgres-backed instance (``config/dagster.yaml`` plus Postgres storage, the
``gpu`` pool at 8 slots as the operations guide sets it), each on the multiprocess executor
(every step in its own process; forkserver start so the steps need not re-import torch).

Upstream of the synthesis group (ingest, base encoders, embeddings, indexes, neighbours) is
materialised once, in process, and its artifacts copied to a second store; the synthesis group
(``image_pairs`` → ``triplets``) then runs for all 8 shards concurrently (tests/concurrency_runs.py)
into the first store, and shard after shard in process into the second. The runs must succeed
without a retry, a lock or serialisation error anywhere, record each shard exactly once in the
event log, and leave the same ``triplets`` and ``images`` rows as the serial run.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    RunsFilter,
    materialize,
)
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)
from postgres_server import postgres_server

from megapairs_dagster.assets.policies import GPU_POOL
from megapairs_dagster.definitions import build_definitions
from megapairs_dagster.demo import write_demo_corpus
from megapairs_dagster.jobs.pipeline import (
    materialize_pipeline,
    pipeline_stages,
    stages_upstream_of,
)
from megapairs_dagster.resources.profiles import load_deployment
from megapairs_dagster.synthesis.triplet_store import TripletStore
from megapairs_dagster.synthesis.views import VIEWS

pytestmark = [pytest.mark.faults, pytest.mark.integration]

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SHARDS = [f"{index:05d}" for index in range(8)]
IMAGES_PER_SHARD = 16
LAUNCH_TIMEOUT_S = 300
SYNTHESIS = ["image_pairs", "pair_descriptions", "description_rejects", "instructions",
             "instruction_rejects", "triplets"]
STEPS = {"image_pairs", "pair_descriptions", "instructions", "triplets"}  # multi-assets: one step
# What a database or file lock, or a Postgres transaction conflict, says when it bites.
LOCK_ERROR = re.compile(
    r"\b(dead)?lock(ed|s)?\b|could not seriali[sz]e|serializ\w* failure|database is locked|"
    r"OperationalError|IntegrityError|UniqueViolation|TransactionRollback|SerializationFailure|"
    r"DeadlockDetected|LockNotAvailable|lock_timeout",
    re.IGNORECASE,
)
# The deployment config file (MEGAPAIRS_CONFIG) that shrinks the demo profile for a test.
SMALL_DEMO = {"resources": {
    "encoders": {"config": {"bootstrap_max_seconds": 2, "bootstrap_max_images": 128}},
    "compute": {"config": {"num_workers": 0, "batch_size": 32}},
    # every neighbour counts, so each small shard mines enough pairs
    "mining": {"config": {"windows": {view: [0.0, 1.0] for view in VIEWS}}},
    # and every pair is described, so each shard has triplets to write
    "generation": {"config": {"max_caption_changes": None}},
}}


@dataclass
class Outcome:
    runs: list  # RunRecords of the 8 concurrent runs
    events: dict  # run_id -> [EventLogEntry]
    materializations: dict  # asset -> [partition of every materialisation event]
    checks: dict  # check name -> [status of every evaluation]
    launcher: subprocess.CompletedProcess
    logs: dict  # name -> text: the launcher's stderr, the steps' compute logs
    concurrent: TripletStore
    serial: TripletStore


def _deployment_env(home: Path, dagster_home: Path, config_file: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEGAPAIRS_", "DAGSTER_"))}
    env.update({"MEGAPAIRS_PROFILE": "demo", "MEGAPAIRS_HOME": str(home),
                "MEGAPAIRS_CONFIG": str(config_file), "MEGAPAIRS_EXECUTOR": "multiprocess",
                "DAGSTER_HOME": str(dagster_home), "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])})
    return env


def _materialise_upstream(defs, resources: dict, instance: DagsterInstance) -> None:
    """What the synthesis group reads, in process, stage by stage as ``make demo`` does; the
    embeddings of all shards in one run (their backfill policy allows it: encoders load once)."""
    assets = list(defs.assets)
    stages = [stage for stage in stages_upstream_of(pipeline_stages(defs.resolve_asset_graph()),
                                                    "triplets")
              if not set(stage.assets) & set(SYNTHESIS)]
    embeddings = next(stage for stage in stages if "embeddings_clip_image" in stage.assets)
    materialize_pipeline(assets, resources, instance, SHARDS,
                         stages=stages[: stages.index(embeddings)], log=lambda _: None)
    result = materialize(assets, selection=list(embeddings.assets), resources=resources,
                         instance=instance, tags={ASSET_PARTITION_RANGE_START_TAG: SHARDS[0],
                                                  ASSET_PARTITION_RANGE_END_TAG: SHARDS[-1]})
    assert result.success
    # the rest; the partitions already materialised are skipped
    materialize_pipeline(assets, resources, instance, SHARDS, stages=stages, log=lambda _: None)


def _launch(root: Path, env: dict) -> subprocess.CompletedProcess:
    """Run tests/concurrency_runs.py over the 8 shards; its output, or a failure if it hangs."""
    out, err = root / "launcher.out", root / "launcher.err"
    command = [sys.executable, str(TESTS / "concurrency_runs.py"), ",".join(SYNTHESIS), *SHARDS]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(command, env=env, cwd=root, stdout=stdout, stderr=stderr,
                                   start_new_session=True)
        try:
            process.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"the runs did not finish in {LAUNCH_TIMEOUT_S} s:\n"
                        f"{out.read_text()}\n{err.read_text()[-6000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out.read_text(),
                                       err.read_text())


@pytest.fixture(scope="module")
def outcome(tmp_path_factory) -> Outcome:
    root = tmp_path_factory.mktemp("concurrency")
    home, serial_home = root / "home", root / "serial_home"
    write_demo_corpus(home / "demo_corpus", len(SHARDS), IMAGES_PER_SHARD, seed=0)
    config_file = root / "config_demo.yaml"
    config_file.write_text(yaml.safe_dump(SMALL_DEMO))
    dagster_home = root / "dagster_home"
    dagster_home.mkdir()
    timings = {}
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("MEGAPAIRS_")]:
            patch.delenv(key)
        deployment = load_deployment("demo", str(home), config_file=str(config_file))
        serial_deployment = load_deployment("demo", str(serial_home), config_file=str(config_file))
    defs = build_definitions(deployment)

    with postgres_server() as server:
        instance_config = yaml.safe_load((REPO / "config" / "dagster.yaml").read_text())
        instance_config["storage"] = {"postgres": {"postgres_db": server.postgres_db()}}
        (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(instance_config))
        with DagsterInstance.from_config(str(dagster_home)) as instance:
            assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
            instance.event_log_storage.set_concurrency_slots(GPU_POOL, len(SHARDS))
            started = time.monotonic()
            _materialise_upstream(defs, deployment.resources, instance)
            timings["upstream, in process"] = time.monotonic() - started
            shutil.copytree(home / "artifacts", serial_home / "artifacts")
            upstream_runs = {record.dagster_run.run_id for record in instance.get_run_records()}

            started = time.monotonic()
            launcher = _launch(root, _deployment_env(home, dagster_home, config_file))
            timings["8 synthesis runs, concurrent"] = time.monotonic() - started

            runs = [record for record in instance.get_run_records()
                    if record.dagster_run.run_id not in upstream_runs]
            events = {record.dagster_run.run_id: instance.all_logs(record.dagster_run.run_id)
                      for record in runs}
            run_ids = list(events)
            materializations = {
                asset: [r.asset_materialization.partition
                        for r in instance.fetch_materializations(AssetKey(asset), limit=1000).records
                        if r.run_id in run_ids]
                for asset in SYNTHESIS
            }
            checks = {
                key.name: [r.status for r in
                           instance.event_log_storage.get_asset_check_execution_history(key, 1000)
                           if r.run_id in run_ids]
                for key in defs.resolve_asset_graph().asset_check_keys
                if key.asset_key == AssetKey("triplets")
            }
            assert not instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))

    serial_defs = build_definitions(serial_deployment)
    started = time.monotonic()
    with DagsterInstance.ephemeral() as serial_instance:
        serial_instance.add_dynamic_partitions("shards", SHARDS)
        for shard in SHARDS:
            result = materialize(list(serial_defs.assets), selection=SYNTHESIS, partition_key=shard,
                                 resources=serial_deployment.resources, instance=serial_instance)
            assert result.success, shard
    timings["8 synthesis runs, serial in process"] = time.monotonic() - started
    print("\ntimings (s):", {name: round(seconds, 1) for name, seconds in timings.items()})

    logs = {"launcher stderr": launcher.stderr}
    for run_id in run_ids:  # the steps' stdout and stderr, as the instance captured them
        for path in sorted((dagster_home / "storage" / run_id / "compute_logs").glob("*.*")):
            if path.suffix in {".err", ".out"}:
                logs[f"{run_id[:8]}/{path.name}"] = path.read_text(errors="replace")
    return Outcome(runs, events, materializations, checks, launcher, logs,
                   *(TripletStore(d.resources["store"].client())
                     for d in (deployment, serial_deployment)))


def _events(outcome: Outcome, run_id: str, kind: DagsterEventType) -> list:
    return [entry for entry in outcome.events[run_id]
            if entry.dagster_event and entry.dagster_event.event_type == kind]


def test_eight_runs_overlapped_and_succeeded_on_the_multiprocess_executor(outcome):
    assert outcome.launcher.returncode == 0, outcome.launcher.stdout + outcome.launcher.stderr[-4000:]
    answers = sorted(line.split()[0] for line in outcome.launcher.stdout.split("\n")
                     if line.endswith(" ok"))
    assert answers == SHARDS, outcome.launcher.stdout
    assert len(outcome.runs) == len(SHARDS)
    assert sorted(r.dagster_run.tags["dagster/partition"] for r in outcome.runs) == SHARDS
    assert all(r.dagster_run.status == DagsterRunStatus.SUCCESS for r in outcome.runs)
    # every run was under way before any finished
    assert max(r.start_time for r in outcome.runs) < min(r.end_time for r in outcome.runs)
    for record in outcome.runs:
        run_id = record.dagster_run.run_id
        engine = " ".join(e.message for e in _events(outcome, run_id, DagsterEventType.ENGINE_EVENT))
        assert "multiprocess executor" in engine, engine[:500]
        workers = {e.step_key for e in _events(outcome, run_id, DagsterEventType.STEP_WORKER_STARTED)}
        succeeded = {e.step_key for e in _events(outcome, run_id, DagsterEventType.STEP_SUCCESS)}
        assert workers == succeeded == STEPS, (workers, succeeded)
    # the shared tables had concurrent writers: triplets steps of several runs at the same time
    writing = [(_step_time(outcome, run_id, "triplets", DagsterEventType.STEP_START),
                _step_time(outcome, run_id, "triplets", DagsterEventType.STEP_SUCCESS))
               for run_id in outcome.events]
    assert _most_at_once(writing) >= 2, writing


def _step_time(outcome: Outcome, run_id: str, step: str, kind: DagsterEventType) -> float:
    (entry,) = [e for e in _events(outcome, run_id, kind) if e.step_key == step]
    return entry.timestamp


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals that overlap at one moment (an end before a start)."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running, most = 0, 0
    for _, change in edges:
        running += change
        most = max(most, running)
    return most


def test_no_lock_or_serialisation_error_and_no_retry(outcome):
    retried = {DagsterEventType.STEP_UP_FOR_RETRY, DagsterEventType.STEP_RESTARTED,
               DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE}
    problems = []
    for run_id, entries in outcome.events.items():
        for entry in entries:
            event = entry.dagster_event
            error = entry.error_info or (event and getattr(event.event_specific_data, "error", None))
            text = f"{entry.user_message} {error.to_string() if error else ''}"
            if (event and event.event_type in retried) or LOCK_ERROR.search(text):
                problems.append((run_id[:8], entry.step_key, text[:300]))
    for name, text in outcome.logs.items():
        problems.extend((name, line[:300]) for line in text.splitlines() if LOCK_ERROR.search(line))
    assert not problems, problems[:10]
    # every step's captured stderr was read, not only the launcher's
    assert sum(name.endswith(".err") for name in outcome.logs) == len(SHARDS) * len(STEPS)


def test_event_log_holds_each_shard_once(outcome):
    for asset in SYNTHESIS:
        assert sorted(outcome.materializations[asset]) == SHARDS, asset
    assert outcome.checks, "no check of triplets found"
    for name, statuses in outcome.checks.items():
        assert statuses == [AssetCheckExecutionRecordStatus.SUCCEEDED] * len(SHARDS), name


def _relative_uris(frame: pd.DataFrame, store: TripletStore) -> pd.DataFrame:
    return frame.assign(uri=frame["uri"].str.removeprefix(store.store.url()))


def test_tables_equal_a_serial_run_with_no_duplicates(outcome):
    concurrent, serial = outcome.concurrent, outcome.serial
    counts = concurrent.counts()
    assert counts == serial.counts()
    assert counts["shards"] == len(SHARDS) and counts["triplets"] > 0
    assert counts["images"] == len(SHARDS) * IMAGES_PER_SHARD
    assert concurrent.duplicate_pairs() == serial.duplicate_pairs() == 0
    frames = [store.triplets_frame().drop(columns="created_at") for store in (concurrent, serial)]
    assert set(zip(frames[0]["query_id"], frames[0]["target_id"])) == set(
        zip(frames[1]["query_id"], frames[1]["target_id"]))
    pd.testing.assert_frame_equal(*frames)
    images = []
    for store in (concurrent, serial):
        with store.connect() as connection:
            frame = connection.execute("SELECT image_id, shard, caption, uri FROM images "
                                       "ORDER BY shard, image_id").df()
        images.append(_relative_uris(frame, store))
    assert not images[0].duplicated(["image_id", "shard"]).any()
    pd.testing.assert_frame_equal(*images)
