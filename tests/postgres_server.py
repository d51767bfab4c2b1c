"""A throwaway PostgreSQL server on loopback for tests of the cluster (Postgres) instance.

Import as ``from postgres_server import postgres_server`` (pytest puts ``tests/`` on
``sys.path``). The server runs from Debian's binaries (``/usr/lib/postgresql/*/bin``) in a
fresh data directory on a free port, with ``trust`` authentication on 127.0.0.1 only. Postgres
refuses to run as root, so under root (CI) the data directory belongs to, and the server runs
as, the ``postgres`` user (or ``nobody``) through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from megapairs_dagster.resources.generation_server import free_port

# Set in .ci/run: there a missing server is a failure, not a skip.
REQUIRE_ENV = "MEGAPAIRS_REQUIRE_POSTGRES"


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    username: str
    db_name: str

    def postgres_db(self) -> dict:
        """The ``storage: postgres: postgres_db:`` block of a dagster.yaml."""
        return {"username": self.username, "password": "unused-trust-auth",
                "hostname": self.host, "db_name": self.db_name, "port": self.port,
                "scheme": "postgresql+psycopg2"}  # SQLAlchemy 2.1's plain scheme means psycopg 3

    def create_database(self, name: str) -> PostgresServer:
        """Another empty database on the same server (one Dagster instance per database)."""
        _create_database(self.port, self.username, name)
        return PostgresServer(self.host, self.port, self.username, name)


def postgres_bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


def require_postgres_bin_dir() -> Path:
    """The server binaries' folder; a skip when missing (a failure when CI requires them)."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        message = "PostgreSQL server binaries (initdb, pg_ctl) not found; apt-get install postgresql"
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(message)
        pytest.skip(message)
    return bin_dir


def _run_as(user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--"] if user else []


@contextmanager
def postgres_server(db_name: str = "dagster", username: str = "dagster") -> Iterator[PostgresServer]:
    """Start a server, create ``db_name``, yield its address; stop it and delete its files."""
    bin_dir = require_postgres_bin_dir()
    user = None
    if os.geteuid() == 0:
        user = next(name for name in ("postgres", "nobody") if _has_user(name))
    root = Path(tempfile.mkdtemp(prefix="megapairs-pg-"))
    data = root / "data"
    if user:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    as_user = _run_as(user)
    port = free_port()
    started = False
    try:
        try:
            subprocess.run(
                [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", username,
                 "--auth=trust", "--encoding=UTF8", "--no-sync"],
                check=True, capture_output=True, timeout=120,
            )
            options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
            started = True  # from here on, always try to stop it
            subprocess.run(
                [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l",
                 str(root / "server.log"), "-o", options, "-w", "-t", "60", "start"],
                check=True, capture_output=True, timeout=90,
            )
        except subprocess.CalledProcessError as error:
            log = root / "server.log"
            raise RuntimeError(
                f"{error.cmd[len(as_user)]} failed: {error.stderr.decode(errors='replace')}"
                + (log.read_text(errors="replace") if log.exists() else "")
            ) from error
        _create_database(port, username, db_name)
        yield PostgresServer("127.0.0.1", port, username, db_name)
    finally:
        if started:
            subprocess.run(
                [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                 "stop"],
                check=False, capture_output=True, timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)


def _create_database(port: int, username: str, db_name: str) -> None:
    import psycopg2

    deadline = time.monotonic() + 30
    while True:
        try:
            connection = psycopg2.connect(host="127.0.0.1", port=port, user=username,
                                          dbname="postgres")
            break
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{db_name}"')
    finally:
        connection.close()


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
