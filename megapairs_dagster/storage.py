"""The artifact store: one root URL (local folder or ``s3://bucket/prefix``) through fsspec.

Plain Python (no dagster import) so notebooks and tests can read artifacts the same way the
pipeline writes them. Writes are atomic: a crash never leaves a half-written file that looks
whole. Locally that is "write a temporary sibling, then ``os.replace``"; on S3 a single PUT
only becomes visible once complete, so the object is written in one call.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec
from upath import UPath


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


class ArtifactStoreClient:
    """Read and write artifacts below ``root`` (a path or URL).

    A local store is read in place; a remote store's folders that a library must open from
    disk (model weights, checkpoints) are copied once into ``cache_dir``.
    """

    def __init__(
        self,
        root: str,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        if not root:
            raise ValueError("artifact store root must not be empty")
        self.storage_options = dict(storage_options or {})
        self.root = UPath(root, **self.storage_options)
        if self.is_local:
            self.root = UPath(os.path.abspath(root))
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

    def exists(self, *parts: str) -> bool:
        return self.path(*parts).exists()

    def write_bytes(self, relpath: str, data: bytes) -> UPath:
        """Write ``data`` at ``relpath`` atomically and return its path."""
        target = self.path(relpath)
        if self.is_local:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(str(target.parent.path)) / f".{target.name}.{uuid.uuid4().hex}.partial"
            try:
                with open(tmp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, target.path)
            finally:
                tmp.unlink(missing_ok=True)
        else:
            self.fs.pipe_file(target.path, data)
        return target

    def read_bytes(self, relpath: str) -> bytes:
        target = self.path(relpath)
        if not target.exists():
            raise FileNotFoundError(f"artifact not found: {target}")
        return target.read_bytes()

    def write_buffer(self, relpath: str, writer) -> UPath:
        """Call ``writer(buffer)`` on an in-memory buffer, then write it atomically."""
        buffer = io.BytesIO()
        writer(buffer)
        return self.write_bytes(relpath, buffer.getvalue())

    def upload_dir(self, local_dir: str | os.PathLike, relpath: str) -> UPath:
        """Copy a local directory's files below ``relpath`` (each file written atomically)."""
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
            self.fs.get(source.path.rstrip("/") + "/", str(partial), recursive=True)
            partial.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(partial, target)
            except OSError:  # another process finished the same download first
                shutil.rmtree(partial, ignore_errors=True)
        return target
