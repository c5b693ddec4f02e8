"""Output storage on any fsspec URL: atomic publishing, retries of transient faults, listings.

Objects are only ever *published* whole: on object stores (S3, GCS, ...) one ``pipe_file``
is a single PUT or a multipart upload, which no reader sees before it completes; on file
systems the bytes go to a unique name under ``_tmp/`` and are renamed into place.

Retries, in two layers that do different jobs:

- **each HTTP request**: on S3 the client library's own retries (botocore, ``mode: adaptive``:
  jittered backoff, and a client-side rate limiter that slows down on throttling), configured
  through s3fs's ``config_kwargs``; s3fs's own retry loop is turned off, so nothing is retried
  three times over;
- **each storage operation** (write an object, read one, list, exists, remove): when the
  library gives up on a fault that ``is_transient`` calls transient (the endpoint down for longer
  than its few attempts), the operation is tried again with jittered exponential backoff until
  the retry budget (``output.storage_retry_s``) is spent; then ``StorageUnavailable`` names the
  URL, the operation and the attempts. Anything else (a missing object, a denied permission, a
  bug) fails at once, as itself.

Faults are classified by what the libraries raise (``is_transient``). Credentials come from the
environment (``AWS_*``), never from the job config, so they never reach a config file, a log line
or an output.
"""
from __future__ import annotations

import asyncio
import json
import logging
import posixpath
import time
import uuid
from typing import Callable, Iterator, TypeVar

import fsspec
import tenacity

from .errors import StorageError, StorageUnavailable, shorten

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_BUDGET_S = 180.0     # default of output.storage_retry_s: outlasts a 60 s outage, not a 10-minute one
RETRY_BASE_S = 0.5
RETRY_MAX_S = 15.0
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"}
# botocore's own retries of each request (through s3fs's config_kwargs): 3 retries, 4 attempts in all
S3_CONFIG = {"retries": {"mode": "adaptive", "max_attempts": 3}, "connect_timeout": 10, "read_timeout": 60}
PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
# S3 error codes that mean "slow down" or "try again" (the 5xx codes are caught by their status too)
RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
               "RequestLimitExceeded", "TooManyRequestsException", "RequestTimeout", "RequestTimeoutException",
               "InternalError", "ServiceUnavailable", "PriorRequestNotComplete", "BandwidthLimitExceeded"}
# connection-level errors of gcsfs / adlfs (google-auth, azure-core) by name: those packages are not
# dependencies, so their classes are not imported; their HTTP errors are classified by status code
CONNECTION_ERROR_NAMES = {"TransportError", "ServiceRequestError", "ServiceResponseError", "ServerDisconnectedError"}


# ---------------------------------------------------------------- what is worth retrying
def _chain(e: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _by_status(status: int) -> bool:
    """Throttling (429), request timeouts (408) and server errors (5xx) pass; other 4xx never will."""
    return status >= 500 or status in (408, 429)


def _library_verdict(e: BaseException) -> bool | None:
    """What a storage client library's exception says (None: not one of theirs)."""
    try:
        import botocore.exceptions as bc
    except ImportError:                                  # pragma: no cover - s3fs is a dependency
        bc = None
    if bc is not None and isinstance(e, bc.ClientError):
        err, meta = e.response.get("Error", {}), e.response.get("ResponseMetadata", {})
        return err.get("Code") in RETRY_CODES or _by_status(int(meta.get("HTTPStatusCode") or 0))
    if bc is not None and isinstance(e, (bc.ConnectionError, bc.HTTPClientError, bc.IncompleteReadError)):
        return True                  # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ...
    if bc is not None and isinstance(e, bc.BotoCoreError):
        return False                 # no credentials, a bad parameter, ...
    try:
        import aiohttp
    except ImportError:                                  # pragma: no cover
        aiohttp = None
    if aiohttp is not None and isinstance(e, aiohttp.ClientResponseError):
        return _by_status(e.status)
    if aiohttp is not None and isinstance(e, aiohttp.ClientError):
        return True                  # connection refused/reset, server disconnected, payload cut short
    if type(e).__name__ in CONNECTION_ERROR_NAMES:
        return True
    status = getattr(e, "status_code", None) or getattr(e, "code", None)
    if type(e).__module__.split(".")[0] in ("google", "gcsfs", "azure", "adlfs") and isinstance(status, int):
        return _by_status(status)
    return None


def is_transient(e: BaseException) -> bool:
    """Worth retrying: a storage fault that may pass (connection errors, timeouts, throttling, 5xx).

    A client library's exception anywhere in the cause chain decides (s3fs turns botocore's
    ``ClientError`` into an ``OSError`` whose cause it is): botocore's connection and timeout
    errors and ``ClientError`` with a throttling code or a 5xx status, aiohttp's client errors,
    yes; a 4xx (denied, not found, bad request), no. Otherwise the Python type decides: timeouts
    and ``OSError`` yes, but never a missing file, a denied permission, or a bug (KeyError, ...).
    """
    for x in _chain(e):
        verdict = _library_verdict(x)
        if verdict is not None:
            return verdict
    if isinstance(e, PERMANENT):
        return False
    return isinstance(e, (OSError, TimeoutError, asyncio.TimeoutError))


def with_retries(fn: Callable[[], T], op: str, url: str, *, budget_s: float | None = None,
                 attempts: int | None = None) -> T:
    """Call ``fn`` (operation ``op`` on ``url``); retry transient faults (``is_transient``) with jittered
    exponential backoff for up to ``budget_s`` seconds (default ``RETRY_BUDGET_S``) or ``attempts``,
    then raise ``StorageUnavailable``. Other errors propagate at once, unchanged."""
    budget = RETRY_BUDGET_S if budget_s is None else budget_s
    t0 = time.monotonic()

    def warn(state: tenacity.RetryCallState) -> None:
        e = state.outcome.exception()
        log.warning("%s: %s failed (%s: %s); attempt %d, retrying in %.1f s (budget %.0f s)", url, op,
                    type(e).__name__, shorten(str(e)), state.attempt_number, state.next_action.sleep, budget)

    def give_up(state: tenacity.RetryCallState):
        e = state.outcome.exception()
        raise StorageUnavailable(url, f"{op} failed after {state.attempt_number} attempt(s) over "
                                      f"{time.monotonic() - t0:.1f} s (retry budget output.storage_retry_s="
                                      f"{budget:g}); last error: {type(e).__name__}: {shorten(str(e))}",
                                 operation=op, attempts=state.attempt_number) from None

    stop = tenacity.stop_before_delay(budget)
    if attempts is not None:
        stop = stop | tenacity.stop_after_attempt(attempts)
    retrying = tenacity.Retrying(retry=tenacity.retry_if_exception(is_transient), stop=stop,
                                 wait=tenacity.wait_random_exponential(multiplier=RETRY_BASE_S, max=RETRY_MAX_S),
                                 before_sleep=warn, retry_error_callback=give_up)
    return retrying(fn)


def open_fs(url: str):
    """(filesystem, path) of a URL; S3 with botocore's adaptive retries and s3fs's own retry loop off."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options = {"config_kwargs": S3_CONFIG} if protocol in ("s3", "s3a") else {}
    fs, path = fsspec.core.url_to_fs(url, **options)
    if options:
        fs.retries = 1           # s3fs's loop around botocore's: one attempt (botocore and ours retry)
    return fs, path


def _is_object_store(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return bool(set(protocols) & OBJECT_STORES)


def write_bytes_atomic(url: str, data: bytes, budget_s: float | None = None) -> None:
    """Write one file at a local path or fsspec URL so that no reader sees it half written: one PUT on
    object stores, else a uniquely named sibling renamed into place. Transient errors are retried."""
    fs, path = open_fs(url)

    def write() -> None:
        if _is_object_store(fs):
            fs.pipe_file(path, data)
            return
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    with_retries(write, "write", url, budget_s=budget_s)


class OutputDir:
    """An output location: relative paths under one fsspec URL; every call retried within ``retry_s``."""

    def __init__(self, url: str, retry_s: float | None = None):
        self.url = url.rstrip("/")
        self.retry_s = retry_s
        self.fs, self.root = open_fs(self.url)
        # object stores publish a whole object per PUT; anything else (local disks, NFS, HDFS, SFTP,
        # ...) may show a partly written file, so it is written under _tmp/ and renamed into place
        self.object_store = _is_object_store(self.fs)

    def _retry(self, fn: Callable[[], T], op: str, rel: str = "", **kw) -> T:
        return with_retries(fn, op, f"{self.url}/{rel}" if rel else self.url, budget_s=self.retry_s, **kw)

    def refresh(self) -> None:
        """Forget cached listings (s3fs caches them): other processes have written since."""
        self.fs.invalidate_cache()

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        return self._retry(lambda: self.fs.exists(self.path(*parts)), "exists", "/".join(parts))

    def read_bytes(self, *parts: str) -> bytes:
        return self._retry(lambda: self.fs.cat_file(self.path(*parts)), "read", "/".join(parts))

    def read_json(self, *parts: str) -> dict:
        return json.loads(self.read_bytes(*parts))

    def read_json_many(self, rels: list[str], chunk: int = 1000) -> list[dict]:
        """Read many small JSON files, in order; object stores fetch each chunk concurrently (``fs.cat``)."""
        out = []
        for i in range(0, len(rels), chunk):
            paths = [self.path(r) for r in rels[i:i + chunk]]
            got = self._retry(lambda: self.fs.cat(paths, on_error="raise"), f"read of {len(paths)} files")
            out += [json.loads(got[p]) for p in paths]
        return out

    def glob(self, *parts: str) -> list[str]:
        return self._retry(lambda: sorted(self.fs.glob(self.path(*parts))), "list", "/".join(parts))

    def publish(self, rel: str, data: bytes) -> None:
        """Make ``rel`` hold exactly ``data``; no reader ever sees a partial object."""
        self._retry(lambda: self._publish_once(rel, lambda p: self.fs.pipe_file(p, data)), "write", rel)

    def publish_file(self, rel: str, local_path: str) -> None:
        """Publish a local file (e.g. a large staging file) the same way, without reading it into memory."""
        self._retry(lambda: self._publish_once(rel, lambda p: self.fs.put_file(local_path, p)), "write", rel)

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
            self._retry(lambda: self.fs.rm(p, recursive=recursive), "remove", rel)

    def entries(self) -> list[str]:
        """Names directly under the output location (empty if it does not exist)."""
        try:
            names = self._retry(lambda: self.fs.ls(self.root, detail=False), "list")
        except FileNotFoundError:
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in names)

    def check_writable(self) -> None:
        """Fail fast, before any generation, if the location cannot be written."""
        try:
            if not self.object_store:            # never create buckets on object stores
                self.fs.makedirs(self.root, exist_ok=True)
            self._retry(lambda: self._publish_once("_tmp/.write-check", lambda p: self.fs.pipe_file(p, b"ok")),
                        "write", attempts=3)
            self.fs.rm(self.path("_tmp/.write-check"))
        except Exception as e:  # noqa: BLE001
            raise StorageError(self.url, f"output.path is not writable: {type(e).__name__}: "
                                         f"{shorten(str(e))}") from None
