"""The garbage collector's pauses are visible in the operator's metrics, and a full
collection walks only what was created since the last one."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from gtvp import gc_pauses
from gtvp.metrics import METRICS


@pytest.fixture
def watched() -> Iterator[None]:
    gc_pauses.watch(complete_every=3)
    try:
        yield
    finally:
        gc_pauses.unwatch()


def _count(generation: str) -> float:
    for metric in METRICS.registry.collect():
        if metric.name == "gtvp_gc_pause_seconds":
            for sample in metric.samples:
                if sample.name.endswith("_count") and sample.labels["generation"] == generation:
                    return sample.value
    raise AssertionError(f"no gtvp_gc_pause_seconds series for generation {generation}")


def test_every_generation_is_exported_before_any_collection_is_recorded() -> None:
    for generation in ("0", "1", "2"):
        assert _count(generation) >= 0


def test_a_full_collection_is_recorded_once_watched(watched: None) -> None:
    gc_pauses.watch(complete_every=3)  # idempotent: one callback, one observation per collection
    before = _count("2")
    gc.collect()
    assert _count("2") == before + 1


def test_what_survives_a_full_collection_is_not_walked_again(watched: None) -> None:
    kept = [[i] for i in range(1000)]  # a view's worth of long-lived (tracked) objects
    gc.collect()
    assert gc.get_freeze_count() >= len(kept)
    walked = {id(o) for g in range(3) for o in gc.get_objects(g)}
    assert not any(id(o) in walked for o in kept)  # frozen: no collection walks them
    kept.pop()  # and one the program lets go of is freed at once (reference counting)


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_a_cycle_that_dies_after_it_was_frozen_is_reclaimed_by_a_complete_collection(
    watched: None,
) -> None:
    cycle = _Cycle()
    gone = weakref.ref(cycle)
    gc.collect()  # survives: frozen
    del cycle  # now garbage, but only in a cycle: reference counting cannot free it
    gc.collect()
    reclaimed_by = None
    for n in range(1, 4):  # every 3rd full collection here walks the frozen objects too
        if gone() is None:
            reclaimed_by = n
            break
        gc.collect()
    assert gone() is None, "a frozen cycle was never reclaimed"
    assert reclaimed_by is not None
