"""Start a test file as a two-process gloo job under torchrun (the DDP tests' workers)."""

import os
import subprocess
import sys
from pathlib import Path

from megapairs_dagster.resources.generation_server import free_port


def run_two_processes(script: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """Run ``script`` (a test file whose ``__main__`` is the worker) on 2 CPU processes, offline,
    one thread each, with a fresh rendezvous port; returns the finished process."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    return subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, *args,
        ],
        cwd=Path(script).parent, env=environment, capture_output=True, text=True,
        timeout=timeout, check=False,
    )
