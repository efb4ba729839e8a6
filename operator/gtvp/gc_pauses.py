"""Python's cyclic garbage collector in a process that holds the whole pool in memory.

At 10,000 members the view holds millions of tracked objects, and a full (generation 2)
collection walks every one of them while every handler, watch and admission request waits.
`watch` records each collection's pause in `gtvp_gc_pause_seconds{generation}` (wall time
between the collector's start and stop callbacks), so a latency tail can be told apart from
the collector's (bench_scale prints the full collections of its window).
"""

from __future__ import annotations

import gc
import time
from typing import Any

from gtvp.metrics import METRICS

_started: dict[int, float] = {}


def _on_collection(phase: str, info: dict[str, Any]) -> None:
    generation = int(info.get("generation", 0))
    if phase == "start":
        _started[generation] = time.perf_counter()
        return
    began = _started.pop(generation, None)
    if began is not None:
        METRICS.gc_pause_seconds.labels(str(generation)).observe(time.perf_counter() - began)


def watch() -> None:
    """Record every collection's pause (idempotent)."""
    if _on_collection not in gc.callbacks:
        gc.callbacks.append(_on_collection)
