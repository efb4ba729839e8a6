"""Python's cyclic garbage collector in a process that holds the whole pool in memory.

At 10,000 members a full (generation 2) collection walked every object the operator holds,
about half a second each, roughly every 20 s, while every handler, watch and admission
request waited (bench_scale: 29 full collections of 542 ms in a 600 s window, where the
verdict latency's p99 lives). `watch` does two things:

- it records each collection's pause in `gtvp_gc_pause_seconds{generation}` (wall time
  between the collector's start and stop callbacks);
- after each full collection it freezes what survived (`gc.freeze()`): those objects are
  out of later collections' walk, so the next full collection walks only what was created
  since. A frozen object is still freed by reference counting when the view lets go of it
  (a Member body replaced by a newer one), which is how almost everything here dies. What
  dies in a reference cycle after it was frozen waits for a complete collection: every
  `complete_every`-th full collection first unfreezes everything and walks it all (one
  long pause in that many).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any

from gtvp.metrics import METRICS

COMPLETE_EVERY = 30
"""Every 30th full collection walks the frozen objects too (a few minutes apart at 10,000
members): cyclic garbage among them never waits longer."""


@dataclass
class _Watch:
    active: bool = False
    complete_every: int = COMPLETE_EVERY
    started: float | None = None
    full: int = 0


_WATCH = _Watch()


def _on_collection(phase: str, info: dict[str, Any]) -> None:
    w = _WATCH
    if not w.active:
        return
    generation = int(info.get("generation", 0))
    if phase == "start":
        w.started = time.perf_counter()
        if generation == 2 and (w.full + 1) % w.complete_every == 0:
            gc.unfreeze()  # this one walks everything: cycles among frozen objects go too
        return
    if w.started is not None:
        METRICS.gc_pause_seconds.labels(str(generation)).observe(time.perf_counter() - w.started)
        w.started = None
    if generation == 2:
        w.full += 1
        gc.freeze()  # the survivors: every generation is empty after a full collection


def watch(complete_every: int = COMPLETE_EVERY) -> None:
    """Record every collection's pause and freeze the survivors of each full one
    (idempotent; `complete_every`: see COMPLETE_EVERY)."""
    _WATCH.active, _WATCH.complete_every = True, max(complete_every, 1)
    if _on_collection not in gc.callbacks:
        gc.callbacks.append(_on_collection)


def unwatch() -> None:
    """Stop, and give every frozen object back to the collector."""
    _WATCH.active = False
    if _on_collection in gc.callbacks:
        gc.callbacks.remove(_on_collection)
    gc.unfreeze()
