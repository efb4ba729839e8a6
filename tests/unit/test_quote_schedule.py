"""When members are asked for their next quote: spread out, never later than one interval."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from gtvp.core.attestation import FIRST_SPREAD, JITTER, _next_quote

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
INTERVAL = dt.timedelta(seconds=60)


@given(st.binary(min_size=64, max_size=64), st.sampled_from([JITTER, FIRST_SPREAD]))
def test_next_quote_is_within_the_spread_and_never_late(entropy: bytes, spread: float) -> None:
    at = _next_quote(NOW, INTERVAL, entropy, spread)
    assert NOW + INTERVAL * (1 - spread) <= at <= NOW + INTERVAL


def test_members_that_enrolled_together_quote_apart() -> None:
    times = {_next_quote(NOW, INTERVAL, bytes([i]) * 64, FIRST_SPREAD) for i in range(200)}
    seconds = sorted((t - NOW).total_seconds() for t in times)
    assert len(times) > 150
    assert seconds[0] < 35
    assert seconds[-1] > 55
