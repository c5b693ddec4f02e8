"""Storage helpers: retries of transient errors only, shard names past a million, typed errors."""
import errno
import pickle
import time

import pytest

from pipeline import storage
from pipeline.errors import ErrorBudgetExceeded, ManifestError, StorageError, StorageUnavailable, caused_by
from pipeline.manifest import parse_shard, shard_name
from pipeline.storage import OutputDir, is_transient, with_retries


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(storage, "RETRY_BASE_S", 0.001)
    monkeypatch.setattr(storage, "RETRY_MAX_S", 0.002)


def failing(exc, times):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= times:
            raise exc
        return "done"
    return fn, calls


def test_transient_storage_errors_are_retried_until_they_pass():
    fn, calls = failing(ConnectionResetError("peer reset"), 3)
    assert with_retries(fn, "write", "s3://b/x") == "done" and len(calls) == 4


@pytest.mark.parametrize("exc", [KeyError("bug"), ValueError("bad"), FileNotFoundError("gone"),
                                 PermissionError("denied")])
def test_bugs_and_permanent_errors_are_not_retried(exc):
    fn, calls = failing(exc, 5)
    with pytest.raises(type(exc)):
        with_retries(fn, "write", "s3://b/x")
    assert len(calls) == 1


def test_retries_give_up_with_a_typed_error_naming_url_operation_and_attempts():
    fn, calls = failing(TimeoutError("slow"), 100)
    with pytest.raises(StorageUnavailable, match=r"s3://b/x: write failed after 3 attempt\(s\).*TimeoutError: slow") as e:
        with_retries(fn, "write", "s3://b/x", attempts=3)
    assert len(calls) == 3 and (e.value.url, e.value.operation, e.value.attempts) == ("s3://b/x", "write", 3)
    assert isinstance(e.value, StorageError) and e.value.__cause__ is None     # one paragraph, no chained trace
    fn, calls = failing(ConnectionResetError("reset"), 10 ** 6)
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable, match="output.storage_retry_s=0.2"):
        with_retries(fn, "list", "s3://b", budget_s=0.2)                 # the budget is time, not attempts
    assert time.monotonic() - t0 < 0.5 and len(calls) > 3


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


def _translated(code: str, status: int) -> OSError:
    """What s3fs raises for a ClientError it has no mapping for: OSError(EIO) caused by it."""
    e = OSError(errno.EIO, f"An error occurred ({code})")
    e.__cause__ = _client_error(code, status)
    return e


def _storage_faults():
    import aiohttp
    import botocore.exceptions as bc
    from fsspec.exceptions import FSTimeoutError

    url = "http://127.0.0.1:9/b/k"
    return [
        (bc.EndpointConnectionError(endpoint_url=url), True), (bc.ConnectTimeoutError(endpoint_url=url), True),
        (bc.ReadTimeoutError(endpoint_url=url), True), (bc.ConnectionClosedError(endpoint_url=url), True),
        (_client_error("SlowDown", 503), True), (_client_error("ThrottlingException", 400), True),
        (_client_error("InternalError", 500), True), (_client_error("Whatever", 502), True),
        (_translated("ServiceUnavailable", 503), True),
        (_client_error("AccessDenied", 403), False), (_client_error("NoSuchKey", 404), False),
        (_translated("InvalidArgument", 400), False),           # an OSError, but the S3 answer says 400
        (bc.NoCredentialsError(), False),
        (aiohttp.ServerDisconnectedError(), True), (aiohttp.ClientPayloadError("cut short"), True),
        (aiohttp.ClientResponseError(None, (), status=503), True),
        (aiohttp.ClientResponseError(None, (), status=403), False),
        (FSTimeoutError(), True), (ConnectionResetError("reset"), True), (TimeoutError("slow"), True),
        (FileNotFoundError("gone"), False), (PermissionError("denied"), False), (KeyError("bug"), False),
    ]


@pytest.mark.parametrize("i", range(len(_storage_faults())))
def test_faults_are_classified_by_what_the_storage_libraries_raise(i):
    error, transient = _storage_faults()[i]
    assert is_transient(error) == transient, repr(error)


def test_s3_uses_botocores_adaptive_retries_and_not_s3fs_loop_on_top(s3_server, s3_bucket):
    out = OutputDir(f"s3://{s3_bucket}/cfg")
    out.publish("x", b"1")
    assert out.fs.retries == 1
    assert out.fs.s3.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 4}   # 1 + 3 retries
    assert out.fs.s3.meta.config.connect_timeout == 10


def test_an_endpoint_that_stays_down_ends_in_storage_unavailable_within_the_budget(s3_server, s3_bucket):
    out = OutputDir(f"s3://{s3_bucket}/down", retry_s=2.0)
    out.publish("before", b"1")
    s3_server.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageUnavailable, match=rf"s3://{s3_bucket}/down/after: write failed after \d+ "
                                                     r"attempt.*EndpointConnectionError") as e:
            out.publish("after", b"2")
        elapsed = time.monotonic() - t0
    finally:
        s3_server.start()
    assert e.value.attempts >= 1 and elapsed < 2.0 + 15, elapsed     # the budget + one attempt's own (botocore) retries
    assert out.read_bytes("before") == b"1"


def test_shard_names_parse_past_a_million_shards(tmp_path):
    from pipeline.sinks import committed_shards

    assert shard_name(1_234_567) == "shard-1234567" and parse_shard("shard-1234567.json") == 1_234_567
    assert parse_shard("shard-000042.tar") == 42
    out = OutputDir(str(tmp_path))
    for s in (0, 999_999, 1_000_000, 1_234_567):
        out.publish(f"stats/{shard_name(s)}.json", b"{}")
    assert committed_shards(out) == [0, 999_999, 1_000_000, 1_234_567]
    with pytest.raises(ValueError):
        parse_shard("notes.json")


def test_typed_errors_keep_their_fields_through_pickling_and_cause_chains():
    e = ManifestError("m.jsonl", "row 3: field 'seed': bad", row=3, field="seed")
    back = pickle.loads(pickle.dumps(e))
    assert (back.source, back.row, back.field, str(back)) == ("m.jsonl", 3, "seed", str(e))
    budget = ErrorBudgetExceeded("out/_errors/", "5 rows failed", failed=5, budget=2)
    try:
        try:
            raise budget
        except ErrorBudgetExceeded as inner:
            raise RuntimeError("a Ray task failed") from inner
    except RuntimeError as outer:
        found = caused_by(outer, ErrorBudgetExceeded)
    assert found is budget and found.failed == 5 and found.where == "out/_errors/"
    assert caused_by(RuntimeError("other"), ErrorBudgetExceeded) is None


def test_the_cli_finds_a_typed_error_behind_ray_wrappers_and_prints_one_paragraph(capsys):
    from ray.data.exceptions import SystemException
    from ray.exceptions import RayTaskError

    from jobs.cli import failure_status
    from pipeline.errors import ConfigError

    original = StorageUnavailable("s3://b/out/x", "write failed after 3 attempt(s) over 9.0 s", operation="write",
                                  attempts=3)
    posing = RayTaskError("write", "Traceback (most recent call last):\n  File ...", original).as_instanceof_cause()
    assert isinstance(posing, StorageUnavailable) and "File ..." in str(posing)      # its str: the remote trace
    try:
        try:
            raise posing
        except Exception as e:                   # what Ray Data raises for a failed task
            raise e.with_traceback(None) from SystemException()
    except Exception as outer:
        assert caused_by(outer, StorageUnavailable) is original and failure_status(outer) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: s3://b/out/x: write failed after 3 attempt(s)") and err.count("\n") == 1
    assert "Traceback" not in err and "rerun the same command" in err
    assert failure_status(ErrorBudgetExceeded("out/_errors/", "5 rows failed")) == 1
    assert failure_status(StorageError("s3://nope", "output.path is not writable")) == 2     # bad input
    assert failure_status(ConfigError("sampler.nfe", "must be >= 1")) == 2
    with pytest.raises(KeyError):
        failure_status(KeyError("a bug keeps its traceback"))
