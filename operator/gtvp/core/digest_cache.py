"""Memoization keyed by a digest of the input bytes, bounded in entries (pure, thread-safe).

`functools.lru_cache` keeps its arguments as keys: for bytes an agent writes (an event log up
to 4 MiB, a certificate chain, a key's public area), every distinct value an attacker on a
node sends would stay in the operator's memory until evicted. `DigestCache` keeps only the
SHA-256 of the input (32 bytes) and the result, evicts the least recently used entry past
`maxsize`, and caches results only: an input that raises is worked out again next time, so a
flood of refused inputs leaves nothing behind. What is cached never decides anything that an
uncached call would decide otherwise.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


def digest_of(*parts: bytes | str) -> bytes:
    """SHA-256 over `parts`, each length-prefixed (no two tuples of parts collide)."""
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.digest()


class DigestCache(Generic[T]):
    """At most `maxsize` results, by the digest of what they were worked out from."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[bytes, T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes, make: Callable[[], T]) -> T:
        """The result cached under `key`, else `make()`, kept (a failure raises, kept not)."""
        got = self.peek(key)
        if got is None:
            got = make()
            self.put(key, got)
        return got

    def peek(self, key: bytes) -> T | None:
        """The result cached under `key` (None: none)."""
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key]

    def put(self, key: bytes, value: T) -> None:
        """Keep `value` under `key` (the least recently used entry goes past `maxsize`)."""
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def drop(self, key: bytes) -> None:
        """Forget what is cached under `key`."""
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
