"""Rehearsal of the paper profile on this CPU, driven the way a user drives it.

The README's section "Running on a real corpus and real models" is executed as written: its
two ```bash blocks are read from README.md, only the values of their `export` lines are
replaced (this test's S3 URLs, config file, tiny model paths, dummy keys), and every other
line runs through bash. The deployment:

- profile ``paper`` with a config file (``MEGAPAIRS_CONFIG``) that points the encoders at a
  tiny EVA02-style open_clip checkpoint (hub layout) and a tiny DINOv2 directory, generation
  (``transformers``) at a tiny LLaVA and a tiny Llama trained to answer in the expected format
  (``paper_deployment.py`` says how and why), and both training runs at the tiny CLIP's
  weights file (the other open_clip loading path);
- corpus: img2dataset-style webdataset shards on S3 (moto on loopback); the artifact store on
  S3 too; a Postgres-backed Dagster instance; the multiprocess executor (the paper default).

Order: (1) a small demo deployment beside it (its own home and DAGSTER_HOME) is created and
snapshotted, and the paper deployment is refused on the demo's DAGSTER_HOME; (2) with one
shard on S3, the README's shell block runs shard 00000 from ingest to ``circo|base`` scores;
(3) a second shard lands and the README's ``make ui`` (web UI + daemon) carries it through by
sensor and automation alone, while a partition backfill (the UI's way) trains and scores the
zero-shot ``base_encoder`` run; then a ``dagster job launch`` of ``training`` (the README's
command) retrains ``base`` on both shards. Every other command runs from an empty working
directory (the README's block from the checkout, which it is written for: ``make ui``,
``config/dagster.yaml``), with HOME and XDG_CACHE_HOME in temporary folders.

Runtime: 11-12 minutes on the 2-core CI machine, 15 on a 2-core machine half as fast (most of
it is ~70 Python processes, CLI commands, run workers and one subprocess per step, each
importing the code location: ~3.7 s on the latter); the per-phase timings are printed with
``pytest -s``.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster_server import REPO, DagsterDev, free_port
from paper_deployment import (
    CommandLog,
    add_postgres_storage,
    build_paper_models,
    checkout_snapshot,
    clean_env,
    copy_instance_config,
    entries_below,
    export_names,
    files_below,
    make_bucket,
    paper_config,
    paper_model_paths,
    readme_bash_blocks,
    s3_listing,
    substitute_exports,
    tree_digest,
    upload_folder,
    write_yaml,
)
from postgres_server import postgres_server
from s3_server import moto_s3

from megapairs_dagster.artifacts import artifact_relpath, load_artifact
from megapairs_dagster.demo import write_demo_benchmark, write_demo_shard
from megapairs_dagster.storage import ArtifactStoreClient

pytestmark = pytest.mark.integration

README_SECTION = "Running on a real corpus and real models"
IMAGES_PER_SHARD = 16
CORPUS_URL = "s3://megapairs-corpus/recap-datacomp/"
STORE_URL = "s3://megapairs-artifacts/paper"
BIN = Path(sys.executable).parent
M = "-m megapairs_dagster.definitions"
# Launched: the zero-shot baseline and `base` (`large` is the same code path on the same tiny
# checkpoint; leaving it out saves two runs).
TRAINING_RUNS = ["base_encoder", "base"]
SCORED = [f"circo|{run}" for run in TRAINING_RUNS]
DAEMON_TIMEOUT = 900  # generous: these shared 2-core machines vary 2-3x


@dataclass
class Rehearsal:
    root: Path
    cache: Path
    log: CommandLog
    shards: list[str] = field(default_factory=lambda: ["00000", "00001"])
    checkout_before: dict = field(default_factory=dict)
    checkout_after: dict = field(default_factory=dict)
    demo_before: dict = field(default_factory=dict)
    demo_after: dict = field(default_factory=dict)
    foreign: object = None
    readme_lines_run: list[str] = field(default_factory=list)
    readme_lines: list[str] = field(default_factory=list)
    corpus_before: set = field(default_factory=set)
    corpus_after: dict = field(default_factory=dict)
    store_listing: dict = field(default_factory=dict)
    home_files: list[str] = field(default_factory=list)
    cache_files: list[str] = field(default_factory=list)
    cwd_files: list[str] = field(default_factory=list)
    materializations: dict = field(default_factory=dict)
    check_records: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)
    run_engine_events: dict = field(default_factory=dict)
    asset_keys: list[str] = field(default_factory=list)
    check_keys: list = field(default_factory=list)
    partitioned: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    training_records: dict = field(default_factory=dict)


def _instance_state(dagster_home: Path) -> dict:
    """Materialisations per asset and partition, and run statuses, of an instance."""
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        counts = {}
        for key in instance.get_asset_keys():
            records = instance.fetch_materializations(key, limit=10_000).records
            counts[key.to_user_string()] = dict(
                Counter(r.asset_materialization.partition for r in records))
        runs = Counter(run.status.value for run in instance.get_runs())
    return {"materializations": counts, "runs": dict(runs)}


def _demo_deployment(root: Path, base_env: dict, cwd: Path, log: CommandLog) -> dict:
    """A demo deployment as `make demo` users have one: its corpus, one ingested shard."""
    home, dagster_home = root / "demo_home", root / "demo_dagster_home"
    copy_instance_config(dagster_home)
    env = {**base_env, "MEGAPAIRS_PROFILE": "demo", "MEGAPAIRS_HOME": str(home),
           "DAGSTER_HOME": str(dagster_home)}
    log.run(f'megapairs demo-corpus --out "$MEGAPAIRS_HOME/demo_corpus" --shards 1 '
            f"--images-per-shard {IMAGES_PER_SHARD}", env=env, cwd=cwd)
    log.run("megapairs shards register", env=env, cwd=cwd, label="demo: megapairs shards register")
    log.run(f"dagster asset materialize {M} --select corpus_images,corpus_rejects --partition 00000",
            env=env, cwd=cwd, label="demo: dagster asset materialize corpus_images[00000]")
    return env


def _demo_snapshot(env: dict) -> dict:
    home, dagster_home = Path(env["MEGAPAIRS_HOME"]), Path(env["DAGSTER_HOME"])
    state = _instance_state(dagster_home)  # read first: opening an instance may touch its files
    return {"home": tree_digest(home), "dagster_home": tree_digest(dagster_home), **state}


def _readme_commands(values: dict[str, str]) -> tuple[list[str], str, list[str], list[str]]:
    """The README's two blocks: block 1's exports (substituted), its one command, block 2's
    lines (its first line substituted), and every line that must run."""
    blocks = readme_bash_blocks(README_SECTION)
    assert len(blocks) == 2, f"README section {README_SECTION!r}: expected 2 bash blocks"
    first, second = blocks
    exports = [substitute_exports(line, values) for line in first if export_names(line)]
    commands = [line for line in first if line.strip() and not export_names(line)]
    assert commands == ["make ui"], f"block 1 runs more than `make ui`: {commands}"
    lines = [line for line in second if line.strip() and not line.lstrip().startswith("#")]
    assert export_names(lines[0]) == ["DAGSTER_HOME"], lines[0]
    return exports, commands[0], lines, [line for block in blocks for line in block if line.strip()]


def _idle(instance: DagsterInstance) -> bool:
    busy = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
            DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]
    return not instance.get_runs(RunsFilter(statuses=busy), limit=1)


def _code_location_keys(config_file: Path) -> tuple[list[str], list, dict]:
    """Asset keys, check keys and partitioned assets of the shipped code location on this
    deployment (built here from the same profile and config file)."""
    from megapairs_dagster.definitions import build_definitions
    from megapairs_dagster.resources.profiles import load_deployment

    defs = build_definitions(load_deployment("paper", config_file=str(config_file)))
    graph = defs.resolve_asset_graph()
    keys = sorted(key.to_user_string() for key in graph.get_all_asset_keys())
    partitioned = {key.to_user_string(): graph.get(key).partitions_def is not None
                   for key in graph.get_all_asset_keys()}
    return keys, sorted(graph.asset_check_keys), partitioned


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> Rehearsal:
    started = time.monotonic()
    root = tmp_path_factory.mktemp("paper_rehearsal")
    cwd, home, cache = root / "cwd", root / "home", root / "xdg_cache"
    for folder in (cwd, home, cache):
        folder.mkdir()
    log = CommandLog()
    checkout_before = checkout_snapshot()
    base_env = clean_env({"PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin", "VIRTUAL_ENV": str(BIN.parent),
                          "HOME": str(home), "XDG_CACHE_HOME": str(cache)})

    with postgres_server() as postgres, moto_s3() as (endpoint, storage_options):
        models = paper_model_paths(root / "models")  # built below, beside the demo setup
        circo = root / "circo"
        config = paper_config(models, circo)
        config["resources"]["store"] = {"config": {"endpoint_url": endpoint}}
        config["resources"]["corpus_source"] = {"config": {"endpoint_url": endpoint,
                                                           "format": "webdataset"}}
        config_file = write_yaml(root / "deployment" / "config_paper.yaml", config)
        corpus = root / "corpus"
        write_demo_shard(corpus, 0, IMAGES_PER_SHARD, seed=7)
        upload_folder(corpus, CORPUS_URL, storage_options)
        make_bucket(STORE_URL, storage_options)
        dagster_home = root / "dagster_paper"
        values = {
            "MEGAPAIRS_PROFILE": "paper", "MEGAPAIRS_CONFIG": str(config_file),
            "MEGAPAIRS_CORPUS_URL": CORPUS_URL, "MEGAPAIRS_STORE_URL": STORE_URL,
            "MEGAPAIRS_MLLM": str(models.mllm), "MEGAPAIRS_LLM": str(models.llm),
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "DAGSTER_HOME": str(dagster_home),
        }
        exports, make_ui, block, readme_lines = _readme_commands(values)
        paper_env = dict(base_env)  # the README's exports add the rest
        prelude = "set -e\n" + "\n".join(exports) + "\n"

        # (1) in the background while the tiny models are built: a demo deployment beside the
        # paper one, snapshotted before the paper run, and the paper deployment refused on the
        # demo's DAGSTER_HOME
        beside: dict = {}

        def demo_and_refusal() -> None:
            beside["env"] = _demo_deployment(root, base_env, cwd, log)
            beside["before"] = _demo_snapshot(beside["env"])
            beside["refused"] = log.run(
                prelude + f"export DAGSTER_HOME={shlex.quote(beside['env']['DAGSTER_HOME'])}\n"
                "megapairs shards register", env=paper_env, cwd=cwd, check=False,
                label="paper on the demo's DAGSTER_HOME: megapairs shards register")

        with ThreadPoolExecutor(1) as pool:
            background = pool.submit(demo_and_refusal)
            t0 = time.monotonic()
            build_paper_models(root / "models")
            write_demo_benchmark(circo, num_queries=20, gallery_size=100)
            timings = {"tiny models + benchmark": time.monotonic() - t0}
            background.result()
        timings["setup, demo deployment beside"] = time.monotonic() - started
        demo_env, demo_before, foreign = beside["env"], beside["before"], beside["refused"]

        # (2) the README's shell block, from the checkout. Its first line copies
        # config/dagster.yaml into the new DAGSTER_HOME; this deployment's instance lives in
        # Postgres, so the storage section is added to that copy before anything uses it.
        run_lines = []
        log.run(prelude + substitute_exports(block[0], values), env=paper_env, cwd=REPO,
                label="README: " + block[0])
        run_lines.append(block[0])
        add_postgres_storage(dagster_home / "dagster.yaml", postgres.postgres_db())
        state = prelude + f"export DAGSTER_HOME={shlex.quote(str(dagster_home))}\n"
        for line in block[1:]:
            if "=" in line.split()[0] and not line.startswith("export "):
                state += line + "\n"  # a shell variable (M=...) for the lines below
            else:
                log.run(state + line, env=paper_env, cwd=REPO, timeout=400, label="README: " + line)
            run_lines.append(line)
        timings["README shell block (shard 00000)"] = sum(
            s for label, s in log.entries if label.startswith("README: "))

        # (3) a second shard lands; `make ui` (web UI + daemon) carries it through
        write_demo_shard(corpus, 1, IMAGES_PER_SHARD, seed=7)
        upload_folder(corpus, CORPUS_URL, storage_options)
        daemon_env = {**paper_env, "PORT": str(free_port()),
                      "MEGAPAIRS_AUTOMATION_INTERVAL_SECONDS": "5"}
        server = DagsterDev(dagster_home, daemon_env, root / "make_ui.log",
                            port=int(daemon_env["PORT"]), command=state + make_ui, cwd=REPO)
        try:
            t0 = time.monotonic()
            server.start(timeout=300)  # `make ui` first installs the package if pyproject changed
            timings["make ui: web UI answering"] = time.monotonic() - t0
            run_lines.append(make_ui)
            instance = server.instance
            # The UI's way, launched at once (it needs no triplets, so it runs beside the
            # automation): a backfill of the zero-shot run and its CIRCO score; the daemon runs
            # the training partition before the score that reads it.
            backfill = server.graphql(
                """mutation($params: LaunchBackfillParams!) {
                     launchPartitionBackfill(backfillParams: $params) {
                       __typename ... on LaunchBackfillSuccess { backfillId }
                       ... on PythonError { message stack } } }""",
                {"params": {"partitionsByAssets": [
                    {"assetKey": {"path": ["mmret_clip"]},
                     "partitions": {"ranges": [{"start": "base_encoder", "end": "base_encoder"}]}},
                    {"assetKey": {"path": ["benchmark_scores"]},
                     "partitions": {"ranges": [{"start": "circo|base_encoder",
                                                "end": "circo|base_encoder"}]}},
                ]}},
            )["data"]["launchPartitionBackfill"]
            assert backfill["__typename"] == "LaunchBackfillSuccess", backfill
            timings["daemon: shard 00001 by sensor + automation, zero-shot backfill"] = server.wait_for(
                "shard 00001 through triplets, the export and the view report rebuilt, and the "
                "zero-shot backfill",
                lambda: "00001" in server.materializations("triplets")
                and server.materializations("megapairs_export")[None] >= 2
                and server.materializations("view_report")[None] >= 2
                and server.materializations("benchmark_scores")["circo|base_encoder"]
                and _idle(instance),
                timeout=DAEMON_TIMEOUT,
            )
            # The README's way, once the new shard's triplets are in: `dagster job launch` of
            # a training run, queued by the command and started by the daemon.
            t0 = time.monotonic()
            log.run(prelude + f"export DAGSTER_HOME={shlex.quote(str(dagster_home))}\n"
                    f"dagster job launch {M} -j training --tags '{{\"dagster/partition\": \"base\"}}'",
                    env=daemon_env, cwd=cwd, label="dagster job launch -j training (base)")
            server.wait_for(
                "the launched training run of mmret_clip[base]",
                lambda: server.materializations("mmret_clip")["base"] >= 2 and _idle(instance),
                timeout=DAEMON_TIMEOUT,
            )
            timings["daemon: dagster job launch -j training (base)"] = time.monotonic() - t0
        finally:
            server.stop()

        # (4) what the deployment left behind
        with DagsterInstance.from_config(str(dagster_home)) as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            materializations = {}
            for key in instance.get_asset_keys():
                records = instance.fetch_materializations(key, limit=10_000).records
                materializations[key.to_user_string()] = Counter(
                    r.asset_materialization.partition for r in records)
            asset_keys, check_keys, partitioned = _code_location_keys(config_file)
            check_records = {
                key: [r.status for r in instance.event_log_storage.get_asset_check_execution_history(
                    key, limit=1000)]
                for key in check_keys
            }
            runs = instance.get_runs()
            engine = {}
            for run in runs:
                records = instance.get_records_for_run(run.run_id, of_type={
                    DagsterEventType.ENGINE_EVENT, DagsterEventType.STEP_WORKER_STARTED,
                    DagsterEventType.STEP_START}).records
                engine[run.run_id] = [
                    (r.event_log_entry.dagster_event.event_type_value,
                     r.event_log_entry.dagster_event.step_key, r.event_log_entry.message)
                    for r in records if r.event_log_entry.dagster_event
                ]
        store_listing = s3_listing(STORE_URL, storage_options)
        client = ArtifactStoreClient(STORE_URL, storage_options)
        records = {run: load_artifact(client, artifact_relpath(["mmret_clip"], run))
                   for run in TRAINING_RUNS}
        corpus_listing = s3_listing(CORPUS_URL, storage_options)

    demo_after = _demo_snapshot(demo_env)
    timings["total"] = time.monotonic() - started
    print("\n--- commands\n" + log.report())
    print("--- phases\n" + "\n".join(f"{s:6.1f}s  {name}" for name, s in timings.items()))
    return Rehearsal(
        root=root, cache=cache, log=log, checkout_before=checkout_before,
        checkout_after=checkout_snapshot(), demo_before=demo_before, demo_after=demo_after,
        foreign=foreign, readme_lines_run=run_lines, readme_lines=readme_lines,
        corpus_before={"00000.tar", "00001.tar"}, corpus_after=corpus_listing,
        store_listing=store_listing, home_files=entries_below(home), cache_files=files_below(cache),
        cwd_files=entries_below(cwd),
        materializations=materializations, check_records=check_records, runs=runs,
        run_engine_events=engine, asset_keys=asset_keys, check_keys=check_keys,
        partitioned=partitioned, timings=timings, training_records=records,
    )


def test_every_readme_command_ran(rehearsal):
    ran = set(rehearsal.readme_lines_run)
    exports = [line for line in rehearsal.readme_lines if export_names(line)]
    missing = [line for line in rehearsal.readme_lines
               if line not in ran and line not in exports and not line.lstrip().startswith("#")]
    assert not missing, f"README lines not run: {missing}"


def test_every_asset_materialised_for_every_shard_and_launched_partition(rehearsal):
    found = rehearsal.materializations
    # mmret_mllm is launched deliberately and the README's commands train MMRet-CLIP only: the
    # MLLM's stages are exercised by tests/test_training_mllm.py, not by this rehearsal.
    expected_partitions = {"mmret_clip": set(TRAINING_RUNS), "benchmark_scores": set(SCORED),
                           "mmret_mllm": set(), "mllm_benchmark_scores": set()}
    problems = {}
    assert "demo_benchmark" not in rehearsal.asset_keys  # the demo's own benchmark
    for asset in rehearsal.asset_keys:
        partitions = set(found.get(asset, {}))
        if asset in expected_partitions:
            want = expected_partitions[asset]
        elif rehearsal.partitioned[asset]:
            want = set(rehearsal.shards)
        else:
            want = {None}
        if not want <= partitions:
            problems[asset] = sorted(map(str, want - partitions))
    assert not problems, f"not materialised: {problems}"
    # the shard flowed through the README's commands once, and the daemon's runs once
    assert found["corpus_images"] == {"00000": 1, "00001": 1}
    assert found["base_encoders"] == {None: 1}  # the baseline is never retrained


def test_every_asset_check_that_ran_passed(rehearsal):
    statuses = rehearsal.check_records
    ran = {key: s for key, s in statuses.items() if s}
    failed = {key.to_user_string(): [x.value for x in s] for key, s in ran.items()
              if any(x != AssetCheckExecutionRecordStatus.SUCCEEDED for x in s)}
    assert not failed, f"asset checks not passed: {failed}"
    # every check of the code location ran at least once
    assert set(ran) == set(rehearsal.check_keys), sorted(
        k.to_user_string() for k in set(rehearsal.check_keys) - set(ran))


def test_runs_succeeded_on_the_multiprocess_executor(rehearsal):
    assert rehearsal.runs, "no runs recorded"
    bad = [(run.run_id[:8], run.job_name, run.status.value) for run in rehearsal.runs
           if run.status != DagsterRunStatus.SUCCESS]
    assert not bad, f"runs that did not succeed: {bad}"
    for run in rehearsal.runs:
        events = rehearsal.run_engine_events[run.run_id]
        steps = {step for kind, step, _ in events if kind == "STEP_START"}
        workers = {step for kind, step, _ in events if kind == "STEP_WORKER_STARTED"}
        engine = " ".join(message for kind, _, message in events if kind == "ENGINE_EVENT")
        assert "multiprocess executor" in engine, (run.job_name, engine[:500])
        assert steps and steps <= workers, (run.job_name, steps - workers)


def test_training_runs_started_from_the_configured_checkpoints(rehearsal):
    records = rehearsal.training_records
    # the zero-shot run is the base encoder (the tiny EVA-CLIP, hub layout) itself
    assert records["base_encoder"]["checkpoint"] is None
    assert records["base_encoder"]["start"]["model_name"].endswith("tiny-eva-clip")
    # `base` starts from the weights file the config names, and the launched run (the latest)
    # trained on the triplets of both shards
    assert records["base"]["start"]["pretrained"].endswith("tiny_eva_clip.safetensors")
    assert records["base"]["data"]["shards"] == rehearsal.shards
    assert records["base"]["report"]["steps"] == 3


def test_the_store_holds_every_artifact_and_the_corpus_is_untouched(rehearsal):
    listing = rehearsal.store_listing
    for table in ("triplets", "images"):
        assert {f"tables/{table}/{shard}.parquet" for shard in rehearsal.shards} <= set(listing)
    assert {f"tables/benchmark_scores/circo/{run}.parquet" for run in TRAINING_RUNS} <= set(listing)
    assert not [path for path in listing if path.endswith((".duckdb", ".db"))]
    assert set(rehearsal.corpus_after) == rehearsal.corpus_before


def test_nothing_written_outside_the_store_and_its_cache(rehearsal):
    assert rehearsal.cwd_files == [], f"files in the working directory: {rehearsal.cwd_files}"
    before, after = rehearsal.checkout_before, rehearsal.checkout_after
    assert after["top_level"] == before["top_level"]
    assert after["watched"] == before["watched"]
    # The store's model cache: ~/.cache/megapairs/<store> under the deployment's XDG_CACHE_HOME.
    store_cache = Path("megapairs") / ArtifactStoreClient(STORE_URL).cache_dir.name
    cached = [path for path in rehearsal.cache_files if Path(path).is_relative_to(store_cache)]
    assert any(path.startswith(f"{store_cache}/mmret_clip/base/") for path in cached), cached
    # matplotlib (the assets' plots) keeps its font cache in XDG_CACHE_HOME and creates an
    # empty config folder in HOME: a library's own cache, not an artifact. Nothing else may
    # appear there.
    outside = [path for path in rehearsal.cache_files
               if path not in cached and not path.startswith("matplotlib/")]
    assert not outside, f"written to XDG_CACHE_HOME outside the store's cache: {outside}"
    home = [path for path in rehearsal.home_files if path not in (".config", ".config/matplotlib")]
    assert home == [], f"written to HOME: {home}"


def test_the_demo_deployment_beside_it_is_untouched(rehearsal):
    before, after = rehearsal.demo_before, rehearsal.demo_after
    assert before["materializations"]["corpus_images"] == {"00000": 1}
    assert after["materializations"] == before["materializations"]
    assert after["runs"] == before["runs"]
    assert after["home"] == before["home"]
    assert after["dagster_home"] == before["dagster_home"]


def test_the_paper_deployment_is_refused_on_the_demos_instance(rehearsal):
    refused = rehearsal.foreign
    assert refused.returncode != 0
    demo_store = str(rehearsal.root / "demo_home" / "artifacts")
    assert demo_store in refused.stderr, refused.stderr[-2000:]
    assert STORE_URL in refused.stderr, refused.stderr[-2000:]


def test_report_timings(rehearsal):
    """Not a timed test (timings vary 2-3x between runs on these machines): prints them."""
    print("\n" + json.dumps({k: round(v, 1) for k, v in rehearsal.timings.items()}, indent=1))
    print(rehearsal.log.report())
