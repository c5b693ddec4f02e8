"""Output storage on any fsspec URL: atomic publishing, retries with backoff, listings.

Objects are only ever *published* whole: on object stores (S3, GCS, ...) one ``pipe_file``
is a single PUT or a multipart upload, which no reader sees before it completes; on file
systems the bytes go to a unique name under ``_tmp/`` and are renamed into place. Transient
errors (throttling, 5xx, dropped connections, a store that is briefly down) are retried
with jittered exponential backoff (tenacity); anything else (a missing file, a denied
permission, a bug) fails at once. Credentials come from the environment (``AWS_*``), never from
the job config, so they never reach a config file, a log line or an output.
"""
from __future__ import annotations

import json
import logging
import posixpath
import uuid
from typing import Callable, TypeVar

import fsspec
import tenacity

from .errors import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_ATTEMPTS = 8
RETRY_BASE_S = 0.5
RETRY_MAX_S = 15.0
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"}


PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(e: BaseException) -> bool:
    """Worth retrying: I/O and network errors (OSError: connection resets, timeouts, and what s3fs makes
    of throttling and 5xx answers), never a missing file, a denied permission, or a bug (KeyError, ...)."""
    return isinstance(e, OSError) and not isinstance(e, PERMANENT)


def with_retries(fn: Callable[[], T], what: str, attempts: int = RETRY_ATTEMPTS) -> T:
    """Call ``fn``; retry transient failures (``is_transient``) with jittered exponential backoff (tenacity)."""
    def warn(state: tenacity.RetryCallState) -> None:
        e = state.outcome.exception()
        log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(e).__name__, e,
                    state.attempt_number, attempts - 1, state.next_action.sleep)
    retrying = tenacity.Retrying(retry=tenacity.retry_if_exception(is_transient), reraise=True,
                                 stop=tenacity.stop_after_attempt(attempts), before_sleep=warn,
                                 wait=tenacity.wait_random_exponential(multiplier=RETRY_BASE_S, max=RETRY_MAX_S))
    return retrying(fn)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write one file at a local path or fsspec URL so that no reader sees it half written: one PUT on
    object stores, else a uniquely named sibling renamed into place. Transient errors are retried."""
    fs, path = fsspec.core.url_to_fs(url)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)

    def write() -> None:
        if set(protocols) & OBJECT_STORES:
            fs.pipe_file(path, data)
            return
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    with_retries(write, f"write {url}")


class OutputDir:
    """An output location: relative paths under one fsspec URL."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        # object stores publish a whole object per PUT; anything else (local disks, NFS, HDFS, SFTP,
        # ...) may show a partly written file, so it is written under _tmp/ and renamed into place
        self.object_store = bool(set(protocols) & OBJECT_STORES)

    def refresh(self) -> None:
        """Forget cached listings (s3fs caches them): other processes have written since."""
        self.fs.invalidate_cache()

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        return with_retries(lambda: self.fs.exists(self.path(*parts)), f"exists {self.url}/{'/'.join(parts)}")

    def read_bytes(self, *parts: str) -> bytes:
        return with_retries(lambda: self.fs.cat_file(self.path(*parts)), f"read {self.url}/{'/'.join(parts)}")

    def read_json(self, *parts: str) -> dict:
        return json.loads(self.read_bytes(*parts))

    def read_json_many(self, rels: list[str], chunk: int = 1000) -> list[dict]:
        """Read many small JSON files, in order; object stores fetch each chunk concurrently (``fs.cat``)."""
        out = []
        for i in range(0, len(rels), chunk):
            paths = [self.path(r) for r in rels[i:i + chunk]]
            got = with_retries(lambda: self.fs.cat(paths, on_error="raise"),
                               f"read {len(paths)} files under {self.url}")
            out += [json.loads(got[p]) for p in paths]
        return out

    def glob(self, *parts: str) -> list[str]:
        return with_retries(lambda: sorted(self.fs.glob(self.path(*parts))), f"list {self.url}/{'/'.join(parts)}")

    def publish(self, rel: str, data: bytes) -> None:
        """Make ``rel`` hold exactly ``data``; no reader ever sees a partial object."""
        with_retries(lambda: self._publish_once(rel, lambda p: self.fs.pipe_file(p, data)), f"write {self.url}/{rel}")

    def publish_file(self, rel: str, local_path: str) -> None:
        """Publish a local file (e.g. a large staging file) the same way, without reading it into memory."""
        with_retries(lambda: self._publish_once(rel, lambda p: self.fs.put_file(local_path, p)),
                     f"write {self.url}/{rel}")

    def _publish_once(self, rel: str, put: Callable[[str], None]) -> None:
        final = self.path(rel)
        if self.object_store:
            put(final)                             # one PUT / multipart upload: atomic on object stores
            return
        tmp = self.path("_tmp", f"{posixpath.basename(rel)}.{uuid.uuid4().hex}")
        self.fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        put(tmp)
        self.fs.mv(tmp, final)                     # rename: atomic on POSIX file systems

    def remove(self, rel: str, recursive: bool = False) -> None:
        p = self.path(rel)
        if self.exists(rel):
            with_retries(lambda: self.fs.rm(p, recursive=recursive), f"remove {self.url}/{rel}")

    def entries(self) -> list[str]:
        """Names directly under the output location (empty if it does not exist)."""
        try:
            names = with_retries(lambda: self.fs.ls(self.root, detail=False), f"list {self.url}")
        except FileNotFoundError:
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in names)

    def check_writable(self) -> None:
        """Fail fast, before any generation, if the location cannot be written."""
        try:
            if not self.object_store:            # never create buckets on object stores
                self.fs.makedirs(self.root, exist_ok=True)
            with_retries(lambda: self._publish_once("_tmp/.write-check", lambda p: self.fs.pipe_file(p, b"ok")),
                         f"write {self.url}", attempts=3)
            self.fs.rm(self.path("_tmp/.write-check"))
        except Exception as e:  # noqa: BLE001
            raise StorageError(self.url, f"output.path is not writable: {type(e).__name__}: {e}") from None
