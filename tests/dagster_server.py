"""Start and stop `dagster dev` (webserver + daemon) on loopback for the server/browser tests.

The server gets a temporary DAGSTER_HOME (config/dagster.yaml copied in, plus a shorter run
queue poll: TEST_INSTANCE_SETTINGS) and a MEGAPAIRS_HOME holding a small demo corpus; the demo
CLIP bootstrap is shortened and the automation sensor ticks every few seconds. `stop()` kills
the whole process group (webserver, daemon, code server, run workers), also when the test fails.

Where the time goes (profiled with a timeline of the instance's ticks, runs and steps): every
step of the demo corpus takes 1-2 s, but each run is a new process that imports the code
location (torch, open_clip: ~15-45 s on 2 loaded cores) after waiting in the queue, and a shard
takes ~13 runs, ~8 of them one after another. So the settings here shorten the waits between
runs, not the work in them.

`DagsterDev` is the same without the demo setup: any DAGSTER_HOME, environment, working
directory and command line (the paper rehearsal starts the README's `make ui` with it).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.scheduler.instigation import InstigatorTick, InstigatorType, TickStatus

from megapairs_dagster.demo import write_demo_shard
from megapairs_dagster.resources.generation_server import free_port

REPO = Path(__file__).resolve().parents[1]
DAGSTER = Path(sys.executable).with_name("dagster")
IMAGES_PER_SHARD = 40
FINISHED_TICKS = [TickStatus.SKIPPED, TickStatus.SUCCESS, TickStatus.FAILURE]
# Appended to the copy of config/dagster.yaml (whose queue, run limit and pools stay as they
# are): the run queue daemon dequeues every second instead of every 5 s (Dagster's default).
# Runs are still queued and started by the daemon; only the poll is shorter.
TEST_INSTANCE_SETTINGS = """
# tests/dagster_server.py: the run queue is polled every second
run_queue:
  dequeue_interval_seconds: 1
"""


class DagsterDev:
    """A process that serves `dagster dev` on ``port`` (the default command, or any shell
    command line such as ``make ui``) with its own environment, working directory and
    DAGSTER_HOME; the helpers read the instance it writes to."""

    # After SIGTERM, how long the rest of the process group may take to exit once the leader
    # has: `make ui` exits at once and leaves dagster dev shutting down its services.
    group_grace_seconds: float = 30

    def __init__(self, dagster_home: Path, env: dict[str, str], log_path: Path, *,
                 port: int | None = None, command: str | None = None, cwd: Path = REPO):
        self.dagster_home = dagster_home
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = env
        self.command = command
        self.cwd = cwd
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._instance: DagsterInstance | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment the server runs in; CLI commands against it need the same."""
        return self._env

    def argv(self) -> list[str]:
        if self.command is not None:
            return ["bash", "-c", self.command]
        return [str(DAGSTER), "dev", "-h", "127.0.0.1", "-p", str(self.port), "-w", "workspace.yaml"]

    def start(self, timeout: float = 120) -> None:
        log = open(self.log_path, "wb")  # noqa: SIM115 (closed by the child's exit)
        self.process = subprocess.Popen(
            self.argv(), cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
            # a child of a non-interactive shell may inherit "ignore SIGINT"; dagster dev maps
            # SIGTERM to its SIGINT handler, so restore the default or it cannot be stopped
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dagster dev exited early:\n{self.log_tail()}")
            try:
                if self.graphql("{ version }")["data"]["version"]:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"dagster dev did not answer in {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self._instance is not None:
            self._instance.dispose()
            self._instance = None
        if self.process is None or self.process.poll() is not None and not _group_alive(self.process.pid):
            return
        pgid = self.process.pid  # start_new_session: the group id is the leader's pid
        try:
            os.killpg(pgid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            # `make ui` exits at once on SIGTERM; wait for the dagster processes of its group
            deadline = time.monotonic() + self.group_grace_seconds
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.5)
            if _group_alive(pgid):
                os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.process.poll() is None:
            self.process.wait(timeout=10)

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 30) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    @property
    def instance(self) -> DagsterInstance:
        """The server's instance, opened here to read events and runs."""
        if self._instance is None:
            self._instance = DagsterInstance.from_config(str(self.dagster_home))
        return self._instance

    def materializations(self, asset: str) -> Counter:
        """Materialisation events per partition key (None for an unpartitioned asset)."""
        records = self.instance.fetch_materializations(AssetKey(asset), limit=10_000).records
        return Counter(record.asset_materialization.partition for record in records)

    def failed_runs(self) -> list[str]:
        runs = self.instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.FAILURE]))
        return [f"{run.run_id[:8]} {sorted(map(str, run.asset_selection or []))} "
                f"{run.tags.get('dagster/partition')}" for run in runs]

    def wait_for(self, what: str, ready, timeout: float, poll: float = 1) -> float:
        """Poll ``ready()`` until true; fail early on a failed run. Returns seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if ready():
                return time.monotonic() - started
            failed = self.failed_runs()
            if failed:
                raise AssertionError(f"runs failed while waiting for {what}: {failed}\n"
                                     f"{self.log_tail()}")
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"dagster dev exited while waiting for {what}:\n{self.log_tail()}")
            time.sleep(poll)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.log_tail()}")

    def sensor_ticks(self, sensor: str, after: float) -> list[InstigatorTick]:
        """The finished ticks of ``sensor`` that started after ``after`` (a time.time()),
        oldest first."""
        ticks = [
            tick
            for state in self.instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
            if state.instigator_name == sensor
            for tick in self.instance.get_ticks(state.instigator_origin_id, state.selector_id,
                                                after=float(after), statuses=FINISHED_TICKS)
        ]
        return sorted(ticks, key=lambda tick: tick.timestamp)

    def wait_for_ticks(self, sensor: str, count: int, after: float, timeout: float = 120):
        """Wait until ``count`` ticks of ``sensor`` have started after ``after`` and finished
        (instead of sleeping for what is hoped to be ``count`` intervals); return them."""
        self.wait_for(f"{count} ticks of {sensor}",
                      lambda: len(self.sensor_ticks(sensor, after)) >= count, timeout)
        return self.sensor_ticks(sensor, after)


class DagsterServer(DagsterDev):
    """`dagster dev` on the demo profile with a temporary DAGSTER_HOME and demo corpus."""

    # The leader is dagster dev itself: once it has exited, what is left are run workers, and a
    # worker still importing the code location acts on SIGTERM only once its run starts (~30 s on
    # 2 loaded cores). The instance is temporary: do not wait for them.
    group_grace_seconds = 5

    def __init__(self, root: Path, shards: int = 1):
        self.root = root
        self.megapairs_home = root / "home"
        self.corpus = self.megapairs_home / "demo_corpus"
        super().__init__(root / "dagster_home", {}, root / "dagster_dev.log")
        self.dagster_home.mkdir(parents=True)
        shutil.copy(REPO / "config" / "dagster.yaml", self.dagster_home / "dagster.yaml")
        with open(self.dagster_home / "dagster.yaml", "a") as config:
            config.write(TEST_INSTANCE_SETTINGS)
        for shard in range(shards):
            self.add_shard(shard)

    def add_shard(self, index: int) -> None:
        write_demo_shard(self.corpus, index, IMAGES_PER_SHARD, seed=0)

    @property
    def env(self) -> dict[str, str]:
        """The environment the server runs in; CLI commands against it need the same."""
        return {
            **os.environ,
            "DAGSTER_HOME": str(self.dagster_home),
            "MEGAPAIRS_HOME": str(self.megapairs_home),
            "MEGAPAIRS_PROFILE": "demo",
            "MEGAPAIRS_BOOTSTRAP_SECONDS": "5",
            "MEGAPAIRS_AUTOMATION_INTERVAL_SECONDS": "5",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def running_server(root: Path, shards: int = 1):
    """Generator for a pytest fixture: a started server, always stopped afterwards."""
    server = DagsterServer(root, shards=shards)
    try:
        server.start()
        yield server
    finally:
        server.stop()
