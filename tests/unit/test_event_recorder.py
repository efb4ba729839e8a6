"""The pure half of event aggregation: which Events count as repeats, and the bounded cache."""

from __future__ import annotations

import datetime as dt

import pytest

from gtvp.event_recorder import MAX_MESSAGE, EventCache, EventKey, ObjectRef, Occurrence

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
OBJ = ObjectRef("gtvp.io/v1alpha1", "Member", "node-1", "uid-1", None)


def key(message: str = "PCR 7 differs", obj: ObjectRef = OBJ, **kw: str) -> EventKey:
    return EventKey.of(obj, kw.get("type_", "Warning"), kw.get("reason", "PcrMismatch"), message)


def occ(name: str = "node-1.abc", at: dt.datetime = T0) -> Occurrence:
    return Occurrence(name, 1, at, at)


def test_cluster_scoped_objects_have_their_events_in_default() -> None:
    assert OBJ.event_namespace == "default"
    assert ObjectRef("v", "LazyBox", "b", "u", "ns").event_namespace == "ns"


def test_the_same_event_is_the_same_key() -> None:
    assert key() == key()
    assert hash(key()) == hash(key())


@pytest.mark.parametrize(
    "other",
    [
        key(message="PCR 0 differs"),
        key(type_="Normal"),
        key(reason="EventLogMismatch"),
        key(obj=ObjectRef("gtvp.io/v1alpha1", "Member", "node-1", "uid-2", None)),
        key(obj=ObjectRef("gtvp.io/v1alpha1", "Member", "node-2", "uid-1", None)),
        key(obj=ObjectRef("gtvp.io/v1alpha1", "LazyBox", "node-1", "uid-1", "default")),
    ],
)
def test_any_difference_is_another_event(other: EventKey) -> None:
    assert other != key()


def test_messages_are_keyed_as_written_truncated() -> None:
    long = "x" * (MAX_MESSAGE + 10)
    assert key(long).message == "x" * MAX_MESSAGE
    assert key(long) == key(long + "more")


def test_a_repeat_counts_and_keeps_the_first_time() -> None:
    later = T0 + dt.timedelta(seconds=30)
    assert occ().repeated(later) == Occurrence("node-1.abc", 2, T0, later)


def test_unknown_key_is_not_recent() -> None:
    assert EventCache().recent(key(), T0) is None


def test_recent_within_the_window() -> None:
    cache = EventCache(window=dt.timedelta(minutes=10))
    cache.remember(key(), occ())
    assert cache.recent(key(), T0 + dt.timedelta(minutes=10)) == occ()
    assert cache.recent(key("another message"), T0) is None


def test_the_window_runs_from_the_last_occurrence() -> None:
    cache = EventCache(window=dt.timedelta(minutes=10))
    last = T0 + dt.timedelta(minutes=9)
    cache.remember(key(), occ().repeated(last))
    assert cache.recent(key(), last + dt.timedelta(minutes=9)) is not None
    assert cache.recent(key(), last + dt.timedelta(minutes=10, seconds=1)) is None
    assert len(cache) == 0  # a stale entry is dropped, not kept


def test_least_recently_used_is_dropped_beyond_max_keys() -> None:
    cache = EventCache(max_keys=2)
    a, b, c = key("a"), key("b"), key("c")
    cache.remember(a, occ("a"))
    cache.remember(b, occ("b"))
    assert cache.recent(a, T0) is not None  # a is now the most recently used
    cache.remember(c, occ("c"))
    assert len(cache) == 2
    assert cache.recent(b, T0) is None
    assert cache.recent(a, T0) == occ("a")
    assert cache.recent(c, T0) == occ("c")


def test_forget() -> None:
    cache = EventCache()
    cache.remember(key(), occ())
    cache.forget(key())
    cache.forget(key())  # forgetting twice is harmless
    assert cache.recent(key(), T0) is None


def test_max_keys_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        EventCache(max_keys=0)
