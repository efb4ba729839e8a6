"""The garbage collector's pauses are visible in the operator's metrics."""

from __future__ import annotations

import gc

from gtvp import gc_pauses
from gtvp.metrics import METRICS


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


def test_a_full_collection_is_recorded_once_watched() -> None:
    gc_pauses.watch()
    gc_pauses.watch()  # idempotent: one callback, one observation per collection
    before = _count("2")
    gc.collect()
    assert _count("2") == before + 1
