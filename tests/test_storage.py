"""Storage helpers: retries of transient errors only, shard names past a million, typed errors."""
import pickle

import pytest

from pipeline import storage
from pipeline.errors import ErrorBudgetExceeded, ManifestError, caused_by
from pipeline.manifest import parse_shard, shard_name
from pipeline.storage import OutputDir, with_retries


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
    assert with_retries(fn, "write x") == "done" and len(calls) == 4


@pytest.mark.parametrize("exc", [KeyError("bug"), ValueError("bad"), FileNotFoundError("gone"),
                                 PermissionError("denied")])
def test_bugs_and_permanent_errors_are_not_retried(exc):
    fn, calls = failing(exc, 5)
    with pytest.raises(type(exc)):
        with_retries(fn, "write x")
    assert len(calls) == 1


def test_retries_give_up_after_the_last_attempt():
    fn, calls = failing(TimeoutError("slow"), 100)
    with pytest.raises(TimeoutError):
        with_retries(fn, "write x", attempts=3)
    assert len(calls) == 3


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
