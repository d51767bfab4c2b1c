"""Fault injection: processes SIGKILLed at seeded random points of every per-shard asset,
writers killed mid-commit of the triplet tables, an object store that fails, hangs or goes
away, and a generator server that goes down (issue 15).

Kills are SIGKILL of a child forked from a warmed-up multiprocessing forkserver (dagster,
torch and the code location already imported: tests/fault_worker.py), at a delay drawn from a
seeded RNG over the measured duration of the asset's run. The kill points are printed
(``pytest -s``) and named in every assertion message.

Fields that legitimately differ between a run and its rerun, and are ignored when artifacts
are compared with the uninterrupted reference run: ``run_id`` in the ``produced_by`` record
(Parquet key-value metadata ``megapairs.produced_by``, the npz ``meta`` array, JSON files) and
the ``created_at`` column of the ``tables/`` files. Everything else must be identical.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import threading
import time
from pathlib import Path

import fault_worker
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import SMALL_SHARD
from dagster import DagsterInstance

from megapairs_dagster.definitions import defs
from megapairs_dagster.demo import write_demo_shard
from megapairs_dagster.jobs.pipeline import (
    materialize_pipeline,
    pipeline_stages,
    stages_upstream_of,
)
from megapairs_dagster.storage import ArtifactStoreClient
from megapairs_dagster.synthesis.triplet_store import TripletStore

pytestmark = pytest.mark.faults

SEED = 15
SHARD = "00000"
TRIALS = 22
SHARD_IMAGES = SMALL_SHARD // 2
IGNORED_METADATA = ("run_id",)
IGNORED_COLUMNS = ("created_at",)


def step_groups() -> list[tuple[str, ...]]:
    """Every per-shard step, as the asset selection that materialises it (multi-assets whole)."""
    graph = defs.resolve_asset_graph()
    groups, seen = [], set()
    for key in graph.toposorted_asset_keys:
        node = graph.get(key)
        names = tuple(sorted(k.to_user_string() for k in node.execution_set_asset_keys))
        if node.partitions_def is None or key in seen or "mmret_clip" in names:
            continue
        if "benchmark_scores" in names:
            continue
        seen |= set(node.execution_set_asset_keys)
        groups.append(names)
    return groups


GROUPS = step_groups()


@pytest.fixture(scope="module")
def forks():
    """A forkserver context whose server has imported everything a worker needs."""
    # Python 3.11's forkserver ignores the parent's sys.path when it preloads (and swallows the
    # ImportError), so the tests folder must be on PYTHONPATH for the preload to take effect.
    tests = str(Path(__file__).parent)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([tests, *paths])
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(fault_worker.PRELOAD)
    return context


def artifact_files(home: Path, group: tuple[str, ...]) -> list[Path]:
    """The files readers open for ``group``'s shard (dot-files are temporaries, excluded)."""
    root = home / "artifacts"
    found = []
    for asset in group:
        folder = root / asset
        found += [p for p in folder.glob(f"{SHARD}.*") if p.is_file()]
        found += [p for p in folder.glob(f"{SHARD}.chunks/*") if p.is_file()]
        if asset == "triplets":
            found += [root / "tables" / table / f"{SHARD}.parquet" for table in ("images", "triplets")]
    return sorted(p for p in found if p.exists() and not p.name.startswith("."))


def temporaries(home: Path) -> list[Path]:
    return sorted(p for p in (home / "artifacts").rglob("*.partial"))


def _without_run_fields(value):
    if isinstance(value, dict):
        return {k: _without_run_fields(v) for k, v in value.items() if k not in IGNORED_METADATA}
    if isinstance(value, list):
        return [_without_run_fields(v) for v in value]
    return value


def normalised(path: Path):
    """A file's content with the named run-specific fields removed (raises if truncated)."""
    data = path.read_bytes()
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        metadata = dict(table.schema.metadata or {})
        if b"pandas" in metadata:
            pandas_metadata = _without_run_fields(json.loads(metadata[b"pandas"]))
            metadata[b"pandas"] = json.dumps(pandas_metadata, sort_keys=True).encode()
        if b"megapairs.produced_by" in metadata:
            produced_by = json.loads(metadata[b"megapairs.produced_by"])
            for field in IGNORED_METADATA:
                produced_by.pop(field, None)
            metadata[b"megapairs.produced_by"] = json.dumps(produced_by, sort_keys=True).encode()
        table = table.drop_columns([c for c in IGNORED_COLUMNS if c in table.column_names])
        return ("parquet", table.to_pydict(), metadata)
    if path.name.endswith(".npz"):
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name].tobytes() for name in archive.files}
        meta = json.loads(arrays.pop("meta").decode())
        for field in IGNORED_METADATA:
            meta.pop(field, None)
        return ("npz", arrays, meta)
    if path.suffix == ".json":
        value = json.loads(data)
        for field in IGNORED_METADATA:
            value.pop(field, None)
        return ("json", value)
    return ("bytes", data)


def differences(got: dict, want: dict) -> list[str]:
    """Which files differ, and in which part (the table, or which metadata key)."""
    found = [f"{name}: missing" for name in sorted(set(want) - set(got))]
    found += [f"{name}: unexpected" for name in sorted(set(got) - set(want))]
    for name in sorted(set(got) & set(want)):
        if got[name] != want[name]:
            parts = [i for i, (a, b) in enumerate(zip(got[name], want[name])) if a != b]
            detail = [(k, got[name][2].get(k), want[name][2].get(k)) for k in want[name][2]
                      if got[name][2].get(k) != want[name][2].get(k)] if 2 in parts else []
            found.append(f"{name}: parts {parts} {detail}"[:1500])
    return found


def snapshot(home: Path, group: tuple[str, ...]) -> dict[str, object]:
    return {str(p.relative_to(home)): normalised(p) for p in artifact_files(home, group)}


def delete_outputs(home: Path, group: tuple[str, ...]) -> None:
    for path in artifact_files(home, group):
        path.unlink()
    for asset in group:
        shutil.rmtree(home / "artifacts" / asset / f"{SHARD}.chunks", ignore_errors=True)


def run_to_completion(forks, home: Path, group, deadline_s: float = 120) -> float:
    started = time.monotonic()
    process = forks.Process(target=fault_worker.materialize_step, args=(str(home), SHARD, list(group)))
    process.start()
    process.join(deadline_s)
    if process.is_alive():
        process.kill()
        process.join()
        pytest.fail(f"{group} did not finish within {deadline_s} s")
    assert process.exitcode == 0, f"{group} failed (exit {process.exitcode})"
    return time.monotonic() - started


@pytest.fixture(scope="module")
def reference(tmp_path_factory, forks):
    """One tiny shard materialised up to ``triplets`` without interruption, then each step
    rerun once in a forked child (timed: the kill delays are drawn over these durations)."""
    home = tmp_path_factory.mktemp("faults")
    write_demo_shard(home / "demo_corpus", 0, SHARD_IMAGES, seed=0)
    stages = pipeline_stages(defs.resolve_asset_graph())
    needed = stages_upstream_of(stages, "triplets")
    stages = tuple(s for s in stages if s in needed or "triplets" in s.assets)
    started = time.monotonic()
    materialize_pipeline(list(defs.assets), fault_worker.fault_resources(home),
                         DagsterInstance.ephemeral(), [SHARD], stages=stages, log=lambda _: None)
    print(f"\nreference pipeline: {time.monotonic() - started:.1f} s")
    expected = {group: snapshot(home, group) for group in GROUPS}
    durations = {}
    for group in GROUPS:
        assert expected[group], f"the reference run wrote no files for {group}"
        durations[group] = run_to_completion(forks, home, group)
        print(f"{group}: {durations[group]:.2f} s in a forked child")
        # A clean rerun in a child reproduces the in-process run: the comparison is meaningful.
        assert snapshot(home, group) == expected[group], (
            f"{group} is not deterministic: {differences(snapshot(home, group), expected[group])}")
    with TripletStore(fault_worker.fault_resources(home)["store"].client()).connect() as con:
        rows = con.execute("SELECT * EXCLUDE (created_at) FROM triplets "
                           "ORDER BY query_id, target_id").fetchall()
    return home, expected, durations, rows


def test_sigkill_at_random_points_of_every_per_shard_asset(reference, forks):
    home, expected, durations, reference_rows = reference
    rng = random.Random(SEED)
    trials = []
    for number in range(TRIALS):
        group = GROUPS[number % len(GROUPS)]
        mode = "fresh" if (number // len(GROUPS)) % 2 == 0 else "overwrite"
        if mode == "fresh":
            delete_outputs(home, group)
        delay = round(rng.uniform(0.0, durations[group]), 3)
        process = forks.Process(target=fault_worker.materialize_step,
                                args=(str(home), SHARD, list(group)))
        process.start()
        process.join(delay)
        killed = process.is_alive()
        if killed:
            process.kill()
        process.join()
        point = (f"trial {number}: SIGKILL {'/'.join(group)} at {delay:.3f} s of "
                 f"{durations[group]:.2f} s ({mode}){'' if killed else ' - finished first'}")
        # What the crash left: every file a reader opens is whole and is the reference's.
        visible = {}
        for path in artifact_files(home, group):
            try:
                visible[str(path.relative_to(home))] = normalised(path)
            except Exception as error:  # noqa: BLE001 - a truncated file, named below
                pytest.fail(f"{point}: a reader sees a broken {path.name}: {error}")
        for name, content in visible.items():
            assert content == expected[group].get(name), f"{point}: {name} differs from reference"
        leftovers = [str(p.relative_to(home)) for p in temporaries(home)]
        trials.append(f"{point}; after the kill {len(visible)}/{len(expected[group])} files "
                      f"visible, {len(leftovers)} hidden temporaries")
        run_to_completion(forks, home, group)
        # The rerun's writes swept the temporaries the killed writer left.
        assert not temporaries(home), f"{point}: left {temporaries(home)}"
        after = snapshot(home, group)
        assert after == expected[group], f"{point}: the rerun differs: {differences(after, expected[group])}"
    print("\n" + "\n".join(trials))
    assert sum("finished first" not in t for t in trials) >= TRIALS // 2, trials
    store = TripletStore(fault_worker.fault_resources(home)["store"].client())
    with store.connect() as con:
        rows = con.execute("SELECT * EXCLUDE (created_at) FROM triplets "
                           "ORDER BY query_id, target_id").fetchall()
    assert rows == reference_rows and store.duplicate_pairs() == 0


WRITER_TRIALS = 8
TABLE_SHARDS = ("00000", "00001", "00002")
TABLE_FILES = {f"{shard}.parquet" for shard in TABLE_SHARDS}


def shard_version(index: int, version: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows (triplets, images) of one version of a shard. The two versions share half their
    pairs and differ in size and text, so a reader that saw a mix of them, or one of them
    twice, would get rows that match neither."""
    count = 400 - 80 * version
    first = index * 100_000 + version * 200
    ids = range(first, first + count)
    triplets = pd.DataFrame({
        "query_id": list(ids),
        "target_id": [i + 50_000 for i in ids],
        "instructions": [[f"v{version} make it {i}", f"v{version} show {i} instead"] for i in ids],
        "hard_negative_ids": [[i + 1, i + 2] for i in ids],
        "views": [["caption", "dino"] for _ in ids],
        "scores": [[0.5, 0.25] for _ in ids],
        "description": [f"version {version}: the pair {i} " + "and its change " * 8 for i in ids],
        "generator_backend": "template", "description_model": "m", "instruction_model": "m",
        "prompt_version": "v1", "config_hash": f"hash{version}",
    })
    images = pd.DataFrame({"image_id": list(ids), "caption": [f"v{version} image {i}" for i in ids],
                           "uri": [f"file:///corpus#image_id={i}" for i in ids]})
    return triplets, images


def table_rows(store: TripletStore) -> dict[tuple[str, str], list[tuple]]:
    """Each table's rows per shard, as a reader sees them through the DuckDB views."""
    found: dict[tuple[str, str], list[tuple]] = {}
    with store.connect() as con:
        for table, key in (("triplets", "query_id, target_id"), ("images", "image_id")):
            rows = con.execute(f"SELECT * EXCLUDE (created_at) FROM {table} "
                               f"ORDER BY shard, {key}").fetchall()
            position = [d[0] for d in con.description].index("shard")
            for row in rows:
                found.setdefault((table, row[position]), []).append(row)
    return found


def fingerprints(store: TripletStore) -> dict[tuple[str, str], tuple[int, int]]:
    """(rows, sum of row hashes) of each table's shards through the DuckDB views: a cheap read
    (so the reader polls often) that a missing, extra or changed row alters. Also checks that
    no file but the shards' own is visible in the tables' folders."""
    for table in ("triplets", "images"):
        folder = Path(store.store.path("tables", table).path)
        visible = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
        assert visible == TABLE_FILES, f"{table}: a reader sees {sorted(visible)}"
    with store.connect() as con:
        return connection_fingerprints(con)


def connection_fingerprints(con) -> dict[tuple[str, str], tuple[int, int]]:
    found = {}
    for table in ("triplets", "images"):
        for shard, rows, digest in con.execute(
            f"SELECT shard, count(*), sum(hash(r)::HUGEINT) FROM "
            f"(SELECT * EXCLUDE (created_at) FROM {table}) AS r GROUP BY shard"
        ).fetchall():
            found[(table, shard)] = (rows, digest)
    return found


def versions_seen(found: dict, versions: list[dict]) -> dict[tuple[str, str], int]:
    """Which version each (table, shard) holds; raises when its rows are neither whole one."""
    seen = {}
    for key in versions[0]:
        matches = [number for number, rows in enumerate(versions) if found.get(key) == rows[key]]
        assert matches, f"{key}: rows {found.get(key)} match no version's {[v[key] for v in versions]}"
        seen[key] = matches[0]
    return seen


class Reader(threading.Thread):
    """Reads both tables through ``TripletStore`` until stopped, and records what it saw."""

    def __init__(self, store: TripletStore, versions: list[dict]):
        super().__init__()
        self.store, self.versions = store, versions
        self.stop = threading.Event()
        self.reads, self.problems, self.seen = 0, [], set()

    def run(self):
        while not self.stop.is_set():
            try:
                self.seen |= set(versions_seen(fingerprints(self.store), self.versions).values())
                self.reads += 1
            except Exception as error:  # noqa: BLE001 - reported with the kill point
                self.problems.append(f"{type(error).__name__}: {error}"[:300])

    def finish(self) -> Reader:
        self.stop.set()
        self.join()
        return self


def test_writers_killed_mid_commit_of_the_triplet_tables(tmp_path, forks):
    """A process replacing shards' rows of ``triplets`` and ``images`` in a loop is SIGKILLed
    at seeded points. A reader polling the DuckDB views throughout sees each shard's old or
    new rows whole (never a part, never both), no temporary file, and after a rerun the
    tables hold exactly a clean run's rows."""
    frames = {shard: [shard_version(i, v) for v in (0, 1)] for i, shard in enumerate(TABLE_SHARDS)}
    versions, clean_rows = [], None
    for version in (0, 1):  # the clean runs: each version written once, uninterrupted
        clean = TripletStore(ArtifactStoreClient(str(tmp_path / f"clean{version}")))
        for shard in TABLE_SHARDS:
            clean.replace_shard(shard, *frames[shard][version])
        versions.append(fingerprints(clean))
        clean_rows = table_rows(clean)  # version 1, which the reruns write
    store = TripletStore(ArtifactStoreClient(str(tmp_path / "store")))
    started = time.monotonic()
    for shard in TABLE_SHARDS:  # the state each trial starts from: version 1 everywhere
        store.replace_shard(shard, *frames[shard][1])
    round_s = time.monotonic() - started
    rng = random.Random(SEED)
    trials, calls, readers = [], set(), []
    for number in range(WRITER_TRIALS):
        delay = round(rng.uniform(0.0, 10 * round_s), 4)
        progress = forks.Array("q", 2, lock=False)  # started, finished replace_shard calls
        process = forks.Process(target=fault_worker.replace_shards_forever,
                                args=(str(tmp_path / "store"), frames, progress))
        process.start()
        deadline = time.monotonic() + 60
        while not progress[0]:
            assert time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.002)
        reader = Reader(store, versions)
        reader.start()
        time.sleep(delay)
        process.kill()
        process.join()
        readers.append(reader.finish())
        call = progress[1]
        calls.add(call)
        shard, version = TABLE_SHARDS[call % len(TABLE_SHARDS)], (call // len(TABLE_SHARDS)) % 2
        point = (f"trial {number}: SIGKILL at {delay * 1000:.1f} ms of the writer's loop "
                 f"({round_s * 1000:.1f} ms a round), in replace #{call} (shard {shard} -> v{version})")
        assert not reader.problems, f"{point}: a reader saw {reader.problems[:3]}"
        after = versions_seen(fingerprints(store), versions)
        hidden = sorted(p.name for p in (tmp_path / "store" / "tables").rglob(".*"))
        assert all(name.endswith(".partial") for name in hidden), f"{point}: {hidden}"
        trials.append(f"{point}; then images v{after[('images', shard)]}, triplets "
                      f"v{after[('triplets', shard)]}; {reader.reads} reads during the trial; "
                      f"{len(hidden)} hidden temporaries")
        for rerun_shard in TABLE_SHARDS:  # the rerun
            store.replace_shard(rerun_shard, *frames[rerun_shard][1])
        assert table_rows(store) == clean_rows, f"{point}: the rerun differs from a clean run"
        # The rerun's writes swept what the killed writer left.
        assert not list((tmp_path / "store" / "tables").rglob(".*")), point
        assert store.duplicate_pairs() == 0, point
    print("\n" + "\n".join(trials))
    # The reader was not idle (it read during every trial and saw both versions), and the kills
    # fell in different calls of the loop.
    assert all(r.reads for r in readers) and set().union(*(r.seen for r in readers)) == {0, 1}
    assert len(calls) >= 3, trials


def test_a_connection_reads_the_files_it_listed_while_a_writer_replaces_them(tmp_path):
    """The deterministic form of the race the trials above hunt: DuckDB reopens a file by its
    path between and within queries, so a shard replaced meanwhile used to reach it as the new
    bytes under the old footer ("TProtocolException: Invalid data"). A connection reads the
    version of each file it listed, whatever a writer renames over it later."""
    frames = {shard: [shard_version(i, v) for v in (0, 1)] for i, shard in enumerate(TABLE_SHARDS)}
    store = TripletStore(ArtifactStoreClient(str(tmp_path)))
    for shard in TABLE_SHARDS:
        store.replace_shard(shard, *frames[shard][0])
    with store.connect() as con:
        listed = connection_fingerprints(con)
        for shard in TABLE_SHARDS:
            store.replace_shard(shard, *frames[shard][1])
        assert connection_fingerprints(con) == listed
    assert fingerprints(store) != listed  # a new connection reads the new files
