"""The artifact store: one root URL (local folder or ``s3://bucket/prefix``) through fsspec.

Plain Python (no dagster import) so notebooks and tests can read artifacts the same way the
pipeline writes them. Writes are atomic: a crash never leaves a half-written file that looks
whole. Locally that is "write a temporary sibling, then ``os.replace``"; on S3 an object only
becomes visible once its PUT (or multipart upload, for objects over 100 MB) completes, so each
object is written in one call and a failed call leaves the previous version or nothing.

S3 requests are retried with backoff and bounded by timeouts (``S3Retries``); what still fails
is raised as ``ArtifactStoreError``, naming the object and the retries it was given.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from upath import UPath

S3_PROTOCOLS = ("s3", "s3a")
# s3fs repeats a whole call that failed on a timeout, a lost connection or SlowDown, on top of
# botocore's retries of each request, and reads nest two such calls: its default (5) would make
# a hung endpoint's wait 5 to 25 times botocore's. With 1 every retry is botocore's, so
# ``S3Retries.attempts`` is exactly what a request gets. Given up: s3fs's resuming of a response
# body that breaks off mid-read; that read fails, and the step's retry policy runs it again.
S3FS_CALL_TRIES = 1
# Failures that say what is wrong with the request, not with the connection: left as they are,
# since callers tell "no such artifact" from "store unreachable" by them.
_NOT_TRANSIENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                  PermissionError, ValueError)


class ArtifactStoreError(OSError):
    """An S3 read or write that still failed after its retries; the cause is chained."""


@dataclass(frozen=True)
class S3Retries:
    """How hard an S3 store tries before a read or write fails.

    Each request is tried up to ``attempts`` times in botocore's standard retry mode (5xx
    responses, throttling, connection errors and timeouts, with jittered exponential backoff).
    ``read_timeout_s`` bounds a wait for response bytes, not a whole transfer.
    """

    attempts: int = 5
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0

    def config_kwargs(self) -> dict[str, Any]:
        """s3fs's ``config_kwargs`` (botocore's ``Config``) for these settings."""
        return {
            "retries": {"total_max_attempts": self.attempts, "mode": "standard"},
            "connect_timeout": self.connect_timeout_s,
            "read_timeout": self.read_timeout_s,
        }

    def describe(self) -> str:
        return (f"up to {self.attempts} attempts per S3 request (connect timeout "
                f"{self.connect_timeout_s:g} s, read timeout {self.read_timeout_s:g} s)")


def default_cache_dir(root: str) -> Path:
    """Where a remote store's files are copied locally: one folder per store URL, so two
    deployments on one machine never share cached weights or checkpoints."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "megapairs" / hashlib.sha256(root.encode()).hexdigest()[:16]


def _check_relative(part: str) -> None:
    """Keys come from outside (shard names, partition keys), so ``../x``, ``/etc/x``,
    ``..\\x``, ``C:x`` or a URL must not pick where an artifact is written or read."""
    if (part.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", part)
            or re.match(r"[A-Za-z]:", part) or "://" in part or "\0" in part):
        raise ValueError(f"artifact path {part!r} is not a relative path inside the store")


def _sweep_dead_partials(folder: Path, name: str) -> None:
    """Remove the temporaries of ``name`` whose writer is gone (a process killed mid-write
    leaves its ``.<name>.<pid>.<uuid>.partial``). A live writer's, this one's or another
    process's, is kept; a local store is one machine's, so its pids are this machine's."""
    prefix = f".{name}."
    for entry in os.scandir(folder):
        if not (entry.name.startswith(prefix) and entry.name.endswith(".partial")):
            continue
        pid = entry.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            Path(entry.path).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class ArtifactStoreClient:
    """Read and write artifacts below ``root`` (a path or URL).

    A local store is read in place; a remote store's folders that a library must open from
    disk (model weights, checkpoints) are copied once into ``cache_dir``. An S3 store's
    retries and timeouts are ``retries`` (defaults when None); they replace those in
    ``storage_options["config_kwargs"]``, which is passed on with them to other readers.
    """

    def __init__(
        self,
        root: str,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
        retries: S3Retries | None = None,
    ):
        if not root:
            raise ValueError("artifact store root must not be empty")
        self.storage_options = dict(storage_options or {})
        self.retries = None
        if fsspec.utils.get_protocol(root) in S3_PROTOCOLS:
            self.retries = retries or S3Retries()
            self.storage_options["config_kwargs"] = {
                **self.storage_options.get("config_kwargs", {}), **self.retries.config_kwargs()
            }
        self.root = UPath(root, **self.storage_options)
        if self.is_local:
            self.root = UPath(os.path.abspath(root))
        if self.retries is not None:
            # Not a constructor option of s3fs; the instance is shared only by clients with
            # these same options, which want the same value.
            self.fs.retries = S3FS_CALL_TRIES
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(str(self.root))

    @property
    def is_local(self) -> bool:
        return self.root.protocol in ("", "file", "local")

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self.root.fs

    def path(self, *parts: str) -> UPath:
        """``parts`` below the root; a part that could reach past it is refused (ValueError)."""
        for part in parts:
            _check_relative(part)
        return self.root.joinpath(*parts)

    def url(self, *parts: str) -> str:
        return str(self.path(*parts))

    @contextmanager
    def _failures(self, action: str, target: UPath) -> Iterator[None]:
        """On S3, re-raise what failed after the retries as an ``ArtifactStoreError`` that
        names the object; answers such as "not found" or "access denied" pass unchanged."""
        if self.retries is None:
            yield
            return
        try:
            yield
        except _NOT_TRANSIENT:
            raise
        except Exception as error:
            raise ArtifactStoreError(
                f"artifact store: {action} {target} failed after {self.retries.describe()}: "
                f"{type(error).__name__}: {error}"
            ) from error

    def exists(self, *parts: str) -> bool:
        target = self.path(*parts)
        with self._failures("checking", target):
            return target.exists()

    def write_bytes(self, relpath: str, data: bytes) -> UPath:
        """Write ``data`` at ``relpath`` atomically and return its path."""
        target = self.path(relpath)
        if self.is_local:
            target.parent.mkdir(parents=True, exist_ok=True)
            folder = Path(str(target.parent.path))
            tmp = folder / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.partial"
            try:
                with open(tmp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, target.path)
            finally:
                tmp.unlink(missing_ok=True)
            _sweep_dead_partials(folder, target.name)
        else:
            with self._failures("writing", target):
                self.fs.pipe_file(target.path, data)
        return target

    def read_bytes(self, relpath: str) -> bytes:
        target = self.path(relpath)
        with self._failures("reading", target):
            if not target.exists():
                raise FileNotFoundError(f"artifact not found: {target}")
            return target.read_bytes()

    def write_buffer(self, relpath: str, writer) -> UPath:
        """Call ``writer(buffer)`` on an in-memory buffer, then write it atomically."""
        buffer = io.BytesIO()
        writer(buffer)
        return self.write_bytes(relpath, buffer.getvalue())

    def upload_dir(self, local_dir: str | os.PathLike, relpath: str) -> UPath:
        """Copy a local directory's files below ``relpath`` (each file written atomically).

        The folder as a whole is not: a failure leaves the files written before it, each
        complete. Readers reach a folder only once the step that uploads it has succeeded
        (Dagster's dependencies), and its rerun writes every file again."""
        local_dir = Path(local_dir)
        for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            self.write_bytes(f"{relpath}/{file.relative_to(local_dir).as_posix()}", file.read_bytes())
        return self.path(relpath)

    def local_dir(self, relpath: str) -> Path:
        """A local directory holding ``relpath``: itself when local, else a cached download."""
        source = self.path(relpath)
        if self.is_local:
            return Path(source.path)
        target = self.cache_dir / relpath
        if not target.exists():
            partial = target.with_name(target.name + f".{uuid.uuid4().hex}.partial")
            try:
                with self._failures("downloading", source):
                    self.fs.get(source.path.rstrip("/") + "/", str(partial), recursive=True)
            except BaseException:  # a failed download must not pile up in the cache
                shutil.rmtree(partial, ignore_errors=True)
                raise
            partial.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(partial, target)
            except OSError:  # another process finished the same download first
                shutil.rmtree(partial, ignore_errors=True)
        return target
