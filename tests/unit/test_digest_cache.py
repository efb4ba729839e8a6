"""What the operator keeps of bytes an agent writes: digests and results, bounded."""

from __future__ import annotations

import datetime as dt
import gc
import tracemalloc
from pathlib import Path

import pytest

from gtvp.core import enrolment, errors, quote
from gtvp.core.digest_cache import DigestCache, digest_of

DATA = Path(__file__).parents[1] / "data" / "uefi-eventlogs"


def test_a_digest_cache_keeps_at_most_its_size_and_never_a_failure() -> None:
    cache: DigestCache[int] = DigestCache(3)
    made: list[int] = []

    def make(n: int) -> int:
        made.append(n)
        return n * n

    for n in range(5):
        assert cache.get(digest_of(str(n)), lambda n=n: make(n)) == n * n
    assert len(cache) == 3
    assert cache.get(digest_of("4"), lambda: make(99)) == 16  # kept: not made again
    assert made == [0, 1, 2, 3, 4]

    def fails() -> int:
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        cache.get(digest_of("bad"), fails)
    assert cache.peek(digest_of("bad")) is None
    assert digest_of("ab", "c") != digest_of("a", "bc")  # parts never run together


def test_a_flood_of_distinct_event_logs_and_ek_chains_leaves_the_operators_memory_bounded() -> None:
    """Root on a node writes a new large event log, or a new junk certificate chain, with
    every evidence: what the operator keeps of them stays bounded, not one copy each."""
    log = (DATA / "binary_bios_measurements").read_bytes()
    base = enrolment.ek_facts  # warm imports
    del base
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(200):  # each a distinct log that parses (a different trailing event)
            quote.replay_event_log(log + _no_action_event(i))
        for i in range(300):  # each a distinct junk chain with a leaf that is no certificate
            with pytest.raises(errors.VerificationError):
                enrolment.check_ek_certificate(
                    ek_spki=b"spki",
                    certificate=b"not a certificate %d" % i,
                    presented_chain=[bytes([i % 256]) * 16000] * 6,
                    ca_bundle_pem="",
                    now=dt.datetime.now(dt.UTC),
                )
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    kept_per_log = len(log) * 4  # a parsed log costs a few times its bytes
    assert after - before < quote.EVENT_LOGS_KEPT * kept_per_log + 8 * 1024 * 1024


def _no_action_event(i: int) -> bytes:
    """A TCG_PCR_EVENT2 EV_NO_ACTION on PCR 0 with a sha256 digest and `i` in its data (it
    extends nothing, so the log still replays)."""
    import struct

    data = b"gtvp-test-%d" % i
    return (
        struct.pack("<II", 0, 0x3)  # PCR 0, EV_NO_ACTION
        + struct.pack("<I", 1)  # one digest
        + struct.pack("<H", 0x000B)  # sha256
        + b"\0" * 32
        + struct.pack("<I", len(data))
        + data
    )
